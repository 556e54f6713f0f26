"""Sampler: logits of the step's sampled rows -> next tokens (and their logprobs).

Order, as in vLLM: penalties (repetition on prompt + output, presence and frequency on the
output), temperature, top-k, top-p, min-p, then a draw. Greedy rows take the argmax of the
penalised logits. Every seeded request draws from its own generator, so its output does not
depend on which other requests share the batch. Logprobs are those of the model's own
distribution (log-softmax of the raw logits), as OpenAI reports them.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.request import Request, TokenLogprob
from engine.sampling_params import SamplingParams


@dataclasses.dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)  # for unseeded requests

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        """logits [S, V] fp32 (any device), one row per request."""
        logits = logits.float().cpu()
        raw = logits
        if any(_has_penalties(r.params) for r in requests):
            logits = logits.clone()
            for row, request in enumerate(requests):
                if _has_penalties(request.params):
                    apply_penalties(logits[row], request)
        if all(r.params.greedy for r in requests):
            tokens = logits.argmax(dim=-1).tolist()
        else:
            tokens = [self._sample_row(logits[row], request)
                      for row, request in enumerate(requests)]
        return SampleResult(tokens, _logprobs(raw, tokens, requests))

    def _sample_row(self, logits: torch.Tensor, request: Request) -> int:
        params = request.params
        if params.greedy:
            return int(logits.argmax())
        probs = filtered_probs(logits, params)
        if not bool(torch.isfinite(probs).all()):  # extreme settings underflowed: be greedy
            return int(logits.argmax())
        generator = request.generator or self.generator
        # exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws i with probability p_i
        noise = torch.empty_like(probs).exponential_(generator=generator)
        return int((probs / noise).argmax())


def _has_penalties(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


def apply_penalties(logits: torch.Tensor, request: Request) -> None:
    """In place on one row [V]."""
    params = request.params
    vocab = logits.shape[0]
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool)
        seen[torch.tensor(request.token_ids, dtype=torch.long)] = True
        penalised = torch.where(logits > 0, logits / params.repetition_penalty,
                                logits * params.repetition_penalty)
        logits.copy_(torch.where(seen, penalised, logits))
    output = request.output_token_ids
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab)
        counts = counts[:vocab].float()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering: probabilities [V]."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass strictly above each token
        drop = torch.zeros_like(probs, dtype=torch.bool)
        drop[order] = before >= params.top_p  # keeps at least the most likely token
        probs = probs.masked_fill(drop, 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def _logprobs(raw: torch.Tensor, tokens: list[int], requests: list[Request]
              ) -> list[TokenLogprob | None]:
    wanted = [r.params.logprobs for r in requests]
    if all(w is None for w in wanted):
        return [None] * len(requests)
    logprobs = raw.log_softmax(dim=-1)
    results: list[TokenLogprob | None] = []
    for row, (token, count) in enumerate(zip(tokens, wanted, strict=True)):
        if count is None:
            results.append(None)
            continue
        top = torch.topk(logprobs[row], count) if count else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else []
        results.append(TokenLogprob(token, float(logprobs[row, token]), pairs))
    return results
