"""Per-row sampling state of one step as device tensors, built once per step.

`SamplingFilters` (from each row's `SamplingParams`): greedy flag, temperature, top-k,
top-p and min-p; `probs` turns logits [S, V] into every row's filtered distribution at once.
`LogitAdjustments` (from each row's request and its history): logit bias, the min_tokens
mask, and the repetition, presence and frequency penalties; `apply` adds them to [S, V].

A row that does not use a transform gets its neutral value (top_k V, top_p inf, min_p 0,
penalty 1 or 0), so one batched op serves a mixed batch; a transform that no row uses is
not run at all. The host packs each kind's per-row numbers into one tensor and uploads it
once (pinned and non-blocking on CUDA): building a batch never waits for the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from engine.request import Request
from engine.sampling_params import SamplingParams

Pairs = tuple[torch.Tensor, torch.Tensor]  # (rows [N], token ids [N]) long on the device


def upload(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without a host sync (pinned, non-blocking copy on CUDA)."""
    if values.device == device:
        return values
    if device.type == "cuda":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)


def take_rows(values: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """values[rows] [len(rows), ...] with the index uploaded without a host sync."""
    if rows == list(range(values.shape[0])):
        return values
    return values.index_select(0, upload(torch.tensor(rows, dtype=torch.long), values.device))


# ---------------------------------------------------------------------- filters
@dataclasses.dataclass
class SamplingFilters:
    """Temperature and the top-k / top-p / min-p filters of every row, [S] each."""

    greedy: torch.Tensor  # [S] bool
    temperature: torch.Tensor  # [S] fp32, 1 on greedy rows
    top_k: torch.Tensor | None  # [S] long, V where off; None when no sampled row uses it
    top_p: torch.Tensor | None  # [S] fp32, inf where off
    min_p: torch.Tensor | None  # [S] fp32, 0 where off
    max_top_k: int | None  # the largest top_k when every sampled row has one

    @classmethod
    def build(cls, params: Sequence[SamplingParams], vocab: int, device: torch.device
              ) -> SamplingFilters:
        rows = [[float(p.greedy), 1.0 if p.greedy else p.temperature, _top_k(p, vocab),
                 p.top_p if p.top_p < 1.0 else float("inf"), p.min_p] for p in params]
        table = upload(torch.tensor(rows, dtype=torch.float32), device)  # [S, 5]
        sampled = [p for p in params if not p.greedy]
        limits = [_top_k(p, vocab) for p in sampled]

        def used(column: int, test: Callable[[SamplingParams], bool]) -> torch.Tensor | None:
            return table[:, column] if any(test(p) for p in sampled) else None

        top_k = used(2, lambda p: _top_k(p, vocab) < vocab)
        return cls(greedy=table[:, 0] > 0, temperature=table[:, 1],
                   top_k=None if top_k is None else top_k.long(),
                   top_p=used(3, lambda p: p.top_p < 1.0), min_p=used(4, lambda p: p.min_p > 0),
                   max_top_k=max(limits) if limits and max(limits) < vocab else None)

    def candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The columns the filters can keep. When every sampled row has a top_k: each row's
        top max(top_k) logits [S, C] in descending order and their token ids [S, C];
        otherwise every token: `logits` [S, V] itself and None."""
        if self.max_top_k is None:
            return logits, None
        top = logits.topk(self.max_top_k, dim=-1)
        return top.values, top.indices

    def probs(self, logits: torch.Tensor, ranked: bool = False) -> torch.Tensor:
        """logits [S, C] -> probabilities [S, C]: temperature, then top-k, top-p, min-p.
        `ranked`: the columns are each row's best tokens in descending order (from
        `candidates`), so top-k is a column cut and top-p needs no sort. A row whose
        filters leave no finite distribution comes out non-finite (the sampler takes its
        argmax instead)."""
        logits = logits / self.temperature.unsqueeze(1)
        order = None
        if not ranked and (self.top_k is not None or self.top_p is not None):
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # [S, V] each
        if self.top_k is not None and ranked:
            columns = torch.arange(logits.shape[1], device=logits.device)  # [C]
            logits = logits.masked_fill(columns >= self.top_k.unsqueeze(1), float("-inf"))
        elif self.top_k is not None:
            kth = sorted_logits.gather(1, (self.top_k - 1).unsqueeze(1))  # [S, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        if self.top_p is not None:
            probs = self._top_p(probs, order)
        if self.min_p is not None:
            floor = self.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [S, 1]
            probs = probs.masked_fill(probs < floor, 0.0)
        return probs / probs.sum(dim=-1, keepdim=True)

    def _top_p(self, probs: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
        """Drop the tokens below the top_p mass [S, C]; `order` sorts each row descending
        (None: the columns already are)."""
        sorted_probs = probs if order is None else probs.gather(1, order)  # softmax keeps order
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each
        drop = before >= self.top_p.unsqueeze(1)  # keeps at least the most likely token
        if order is not None:
            drop = torch.zeros_like(drop).scatter_(1, order, drop)
        return probs.masked_fill(drop, 0.0)


def _top_k(params: SamplingParams, vocab: int) -> int:
    return params.top_k if 0 < params.top_k < vocab else vocab


# ---------------------------------------------------------------------- adjustments
@dataclasses.dataclass
class LogitAdjustments:
    """What each row's request adds to its logits; a field is None when no row uses it."""

    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, ids, biases [B]
    banned: Pairs | None  # eos and stop ids of rows still short of min_tokens
    seen: Pairs | None  # prompt and output tokens of rows with a repetition penalty
    generated: Pairs | None  # output tokens of rows with a presence or frequency penalty
    repetition: torch.Tensor  # [S] fp32, 1 where off
    presence: torch.Tensor  # [S] fp32
    frequency: torch.Tensor  # [S] fp32

    @classmethod
    def build(cls, requests: Sequence[Request], device: torch.device) -> LogitAdjustments:
        groups = [_pairs(requests, lambda r: [t for t, _ in r.params.logit_bias]),
                  _pairs(requests, _min_tokens_banned),
                  _pairs(requests, lambda r: r.token_ids if r.params.repetition_penalty != 1.0
                         else []),
                  _pairs(requests, lambda r: r.output_token_ids if _has_occurrence_penalty(
                      r.params) else [])]
        longs = upload(torch.tensor([v for g in groups for v in (*g[0], *g[1])],
                                    dtype=torch.long), device)
        floats = upload(torch.tensor(
            [r.params.repetition_penalty for r in requests]
            + [r.params.presence_penalty for r in requests]
            + [r.params.frequency_penalty for r in requests]
            + [b for r in requests for _, b in r.params.logit_bias], dtype=torch.float32),
            device)
        pairs, start = [], 0
        for rows, _ in groups:  # device views of each group's rows and token ids
            count = len(rows)
            pairs.append((longs[start:start + count], longs[start + count:start + 2 * count])
                         if count else None)
            start += 2 * count
        size = len(requests)
        bias = None if pairs[0] is None else (*pairs[0], floats[3 * size:])
        return cls(bias=bias, banned=pairs[1], seen=pairs[2], generated=pairs[3],
                   repetition=floats[:size], presence=floats[size:2 * size],
                   frequency=floats[2 * size:3 * size])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [S, V] -> adjusted [S, V]: logit bias, the min_tokens mask, then the
        penalties (vLLM v1's order). `logits` itself when no row is adjusted."""
        if self.bias is None and self.banned is None:
            return self.penalise(logits)
        logits = logits.clone()
        if self.bias is not None:
            rows, ids, values = self.bias
            logits.index_put_((rows, ids), values, accumulate=True)
        if self.banned is not None:
            logits.masked_fill_(_mask(logits, self.banned), float("-inf"))
        return self.penalise(logits)

    def penalise(self, logits: torch.Tensor) -> torch.Tensor:
        """Repetition on prompt + output, then presence and frequency on the output [S, V]."""
        if self.seen is not None:
            penalty = self.repetition.unsqueeze(1)  # [S, 1]
            penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(_mask(logits, self.seen), penalised, logits)
        if self.generated is not None:
            rows, ids = self.generated
            counts = torch.zeros_like(logits)  # [S, V] occurrences in the output
            counts.index_put_((rows, ids), torch.ones_like(ids, dtype=logits.dtype),
                              accumulate=True)
            logits = logits - (self.frequency.unsqueeze(1) * counts
                               + self.presence.unsqueeze(1) * (counts > 0))
        return logits


def adjusts(request: Request) -> bool:
    """Whether `LogitAdjustments` changes this request's logits at all."""
    params = request.params
    return bool(params.logit_bias or _min_tokens_banned(request)
                or params.repetition_penalty != 1.0 or _has_occurrence_penalty(params))


def _pairs(requests: Sequence[Request], tokens_of: Callable[[Request], list[int]]
           ) -> tuple[list[int], list[int]]:
    """(row, token) pairs [N] of every row's tokens, flat: host lists."""
    rows: list[int] = []
    tokens: list[int] = []
    for row, request in enumerate(requests):
        ids = tokens_of(request)
        rows += [row] * len(ids)
        tokens += ids
    return rows, tokens


def _mask(logits: torch.Tensor, pairs: Pairs) -> torch.Tensor:
    """[S, V] bool, True at the given (row, token) pairs."""
    rows, ids = pairs
    mask = torch.zeros_like(logits, dtype=torch.bool)
    return mask.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.bool))


def _min_tokens_banned(request: Request) -> list[int]:
    """eos (unless ignored) and stop_token_ids while the request is short of min_tokens."""
    params = request.params
    if request.num_output_tokens >= params.min_tokens:
        return []
    stops = set(params.stop_token_ids)
    if not params.ignore_eos:
        stops.add(request.eos_token_id)
    return sorted(stops)


def _has_occurrence_penalty(params: SamplingParams) -> bool:
    return params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
