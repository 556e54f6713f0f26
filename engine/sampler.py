"""Sampler: logits of the step's sampled rows -> next tokens (and their logprobs), batched
on the logits' device, with one device-to-host copy per call.

Order, as in vLLM v1: logit bias and the min_tokens mask, penalties (repetition on prompt +
output, presence and frequency on the output), then temperature, top-k, top-p, min-p and a
draw. Greedy rows take the argmax of the adjusted logits. When every sampling row has a
top_k, the filters and the draw work on each row's top max(top_k) candidates instead of the
whole vocabulary (no full sort, a smaller draw). The draw is an exponential race (argmax
p_i / E_i with E_i ~ Exp(1) draws i with probability p_i): unseeded rows share one batched
draw from the engine's generator, and every seeded request draws one value per vocabulary
token from its own generator, so its output does not depend on which other requests share
the batch. Logprobs are those of the model's own distribution (log-softmax of the raw
logits), as OpenAI reports them.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.logprobs import logprob_entries, logprob_table
from engine.request import Request, TokenLogprob
from engine.sampling_batch import LogitAdjustments, SamplingFilters, adjusts
from engine.sampling_params import SamplingParams


@dataclasses.dataclass
class DeviceSample:
    """A step's draw still on the device: `table` [S, 1] token ids, or [S, 2 + 2k] with
    their logprobs and the top k (`logprob_table`), for the engine's one read-back."""

    table: torch.Tensor
    counts: list[int | None]  # logprobs asked per row

    def result(self, host_table: torch.Tensor) -> SampleResult:
        """The host copy of `table` -> tokens and logprob entries."""
        if all(c is None for c in self.counts):
            return SampleResult(host_table[:, 0].long().tolist(), [None] * len(self.counts))
        rows = host_table.tolist()
        return SampleResult([int(row[0]) for row in rows], logprob_entries(rows, self.counts))


@dataclasses.dataclass
class SampleResult:
    """What the host gets back from one call: a token and its logprob entry per row."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}  # for unseeded rows

    def generator_on(self, device: torch.device) -> torch.Generator:
        """The engine's generator on `device`, created at its first draw there."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        """logits [S, V] (any float dtype, any device), one row per request; the result
        comes back in one device-to-host copy."""
        sample = self.sample(logits, requests)
        return sample.result(sample.table.cpu())

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> DeviceSample:
        """The draw, left on the device (the engine reads it back with the step's other
        results in one copy)."""
        raw = logits.float()
        adjusted = raw  # [S, V]
        if any(adjusts(r) for r in requests):
            adjusted = LogitAdjustments.build(requests, raw.device).apply(raw)
        tokens = adjusted.argmax(dim=-1)  # [S]: the greedy choice
        if not all(r.params.greedy for r in requests):
            tokens = self._draw(adjusted, requests, tokens)
        return _table(raw, tokens, requests)

    def _draw(self, logits: torch.Tensor, requests: list[Request], greedy_tokens: torch.Tensor
              ) -> torch.Tensor:
        """Sampled tokens [S]; greedy rows, and rows whose filters left no finite
        distribution (vanishing temperature or top_p), keep their argmax."""
        filters = SamplingFilters.build([r.params for r in requests], logits.shape[-1],
                                        logits.device)
        values, ids = filters.candidates(logits)  # [S, C], token ids [S, C] or None (C = V)
        probs = filters.probs(values, ranked=ids is not None)  # [S, C]
        column = (probs / self._noise(probs, requests, ids, logits.shape[-1])).argmax(dim=-1)
        sampled = column if ids is None else ids.gather(1, column.unsqueeze(1)).squeeze(1)
        fallback = filters.greedy | ~torch.isfinite(probs).all(dim=-1)
        return torch.where(fallback, greedy_tokens, sampled)

    def _noise(self, probs: torch.Tensor, requests: list[Request], ids: torch.Tensor | None,
               vocab: int) -> torch.Tensor:
        """Exp(1) noise [S, C]: one draw for the unseeded rows; a seeded row draws one value
        per token id of the vocabulary from its own generator (whatever columns this batch
        keeps), so its tokens do not depend on the batch."""
        drawing = [(row, r) for row, r in enumerate(requests) if not r.params.greedy]
        if any(r.params.seed is None for _, r in drawing):
            noise = torch.empty_like(probs).exponential_(generator=self.generator_on(probs.device))
        else:
            noise = torch.ones_like(probs)
        for row, request in drawing:
            generator = request.generator_on(probs.device)
            if generator is None:
                continue
            if ids is None:
                noise[row].exponential_(generator=generator)
            else:
                per_token = torch.empty(vocab, device=probs.device).exponential_(
                    generator=generator)  # [V]
                noise[row] = per_token.index_select(0, ids[row])
        return noise


def _table(raw: torch.Tensor, tokens: torch.Tensor, requests: list[Request]) -> DeviceSample:
    """The sampled ids and, if any row asks, their logprobs: one tensor to read back."""
    counts = [r.params.logprobs for r in requests]
    wanted = [c for c in counts if c is not None]
    if not wanted:
        return DeviceSample(tokens.unsqueeze(1).double(), counts)
    return DeviceSample(logprob_table(raw, tokens, max(wanted)), counts)


def apply_penalties(logits: torch.Tensor, request: Request) -> None:
    """The penalties of one request on one row [V], in place (the batched path, batch 1)."""
    adjustments = LogitAdjustments.build([request], logits.device)
    logits.copy_(adjustments.penalise(logits.unsqueeze(0))[0])


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p on one row [V]: probabilities [V]."""
    if params.greedy:
        raise ValueError(f"filtered_probs needs a sampling temperature (>= 1e-5), got "
                         f"{params.temperature}")
    filters = SamplingFilters.build([params], logits.shape[0], logits.device)
    return filters.probs(logits.unsqueeze(0))[0]
