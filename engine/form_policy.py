"""Which form each (layer, loop step) runs in: a cost model measured on the runner's device.

The host does not know how many tokens still loop at a step (that would be a sync), so
the choice is made from what it does know: the step's rows T, and the survival rate of
each (layer, step) seen on earlier engine steps (an exponential average of active / T).
With A = T * survival predicted:

    masked     cost(T) + merge(T)                          every row, no sync
    compacted  (1 - z) cost(A / (1 - z)) + gather + sync   fewer rows, a data-dependent shape

`cost(M)` is the measured time of one (layer, step) of the model's dense work at M rows
(memory read, qkv, output projection and MLP), interpolated between the sizes calibrated
at start-up; `merge` is the measured time of the masked form's own extra ops (the
`torch.where`s that keep halted rows as they are), `gather + sync` that of the
compaction's extra ops and of one device-to-host round trip. z is the share of earlier
engine steps in which no token at all was left at this (layer, step) (an exponential
average too): the compacted form then skips the step's dense work, and the layer's later
steps, entirely, which the masked form cannot know. Without z, a small batch whose
tokens mostly halt early would be priced at cost(A) for a fractional A, almost the whole
step, and never compacted. On CPU the sync is free and rows cost, so compaction wins as
soon as tokens halt; on a GPU at small batch a step's cost hardly depends on its rows
(weights are read either way), so the masked form wins there.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections.abc import Callable

import torch

from engine.serving_block import ServingBlock
from model.looplm import LoopLM

MASKED, COMPACTED = "masked", "compacted"
FORMS = ("auto", MASKED, COMPACTED)
CALIBRATION_ROWS = (1, 4, 16, 64, 256)


def _interpolate(rows: list[int], secs: list[float], num_rows: float) -> float:
    """Piecewise-linear (linear extrapolation past the largest size)."""
    i = min(max(bisect.bisect_left(rows, num_rows), 1), len(rows) - 1)
    lo, hi = rows[i - 1], rows[i]
    slope = (secs[i] - secs[i - 1]) / (hi - lo)
    return max(0.0, secs[i - 1] + slope * (num_rows - lo))


@dataclasses.dataclass
class CostModel:
    rows: list[int]  # calibrated row counts, ascending
    seconds: list[float]  # time of one dense (layer, step) at each
    compaction_seconds: list[float]  # the compacted form's extra ops and sync, at each
    merge_seconds: list[float] | None = None  # the masked form's extra ops, at each

    def cost(self, num_rows: float) -> float:
        return _interpolate(self.rows, self.seconds, num_rows)

    def compaction(self, num_rows: float) -> float:
        return _interpolate(self.rows, self.compaction_seconds, num_rows)

    def merge(self, num_rows: float) -> float:
        return 0.0 if self.merge_seconds is None else _interpolate(self.rows,
                                                                   self.merge_seconds, num_rows)

    def compacted_pays(self, total: int, predicted_active: float, empty_share: float = 0.0
                       ) -> bool:
        """Compare both forms' expected time at `total` rows, `predicted_active` of them
        still looping on average, and none at all in `empty_share` of the steps."""
        busy = 1.0 - min(max(empty_share, 0.0), 1.0)
        dense = busy * self.cost(predicted_active / busy) if busy > 0 else 0.0
        return dense + self.compaction(total) < self.cost(total) + self.merge(total)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def calibrate(model: LoopLM, max_rows: int) -> CostModel:
    """Time the first layer's dense step at a few sizes up to `max_rows`, and the extra ops
    of a compaction (a `nonzero`, its sync, gathers and scatters) at the same sizes."""
    block = ServingBlock(model.layers[0], model.global_bank)
    device, cfg = model.device, model.config
    sizes = sorted({min(r, max_rows) for r in CALIBRATION_ROWS} | {max_rows})
    if len(sizes) == 1:
        sizes = [sizes[0], sizes[0] + 1]
    seconds = []
    for rows in sizes:
        h = torch.randn(rows, cfg.d_model, device=device).to(model.dtype)
        rope = torch.ones(rows, 1, cfg.head_dim // 2, dtype=torch.complex64, device=device)
        attn = torch.zeros(rows, cfg.q_dim, device=device, dtype=model.dtype)

        def dense(h=h, rope=rope, attn=attn):
            x, _ = block.read_memory(h)
            block.project_qkv(x, rope)
            return block.halt_probability(block.finish_step(x, attn, 1), 1)

        seconds.append(_timed(dense, device))
    return CostModel(sizes, _monotone(seconds), [_compaction_time(model, rows) for rows in sizes],
                     [_merge_time(model, rows) for rows in sizes])


def _monotone(seconds: list[float]) -> list[float]:
    """A step at fewer rows never costs more than at more: where noise (a busy machine)
    made it, take the larger size's time instead."""
    out = list(seconds)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


def _merge_time(model: LoopLM, rows: int) -> float:
    """The masked form's ops beyond the dense step (see `loop_step.masked_step`)."""
    device, cfg = model.device, model.config
    f32 = dict(device=device, dtype=torch.float32)
    active = torch.arange(rows, device=device) % 2 == 0
    halted = torch.zeros(rows, dtype=torch.bool, device=device)
    kv = torch.randn(rows, 2, cfg.n_kv_heads, cfg.head_dim, device=device).to(model.dtype)
    state = torch.randn(rows, cfg.d_model, device=device).to(model.dtype)
    mixture, weight = torch.zeros(rows, cfg.d_model, **f32), torch.rand(rows, 1, **f32)
    gate_sum, gates = torch.zeros(rows, 2, **f32), torch.rand(rows, 2, **f32)
    depth = torch.zeros(rows, dtype=torch.long, device=device)

    def merge():
        torch.where(active[:, None, None, None], kv, kv)
        mixture.addcmul_(weight, state)
        gate_sum.addcmul_(gates, active.unsqueeze(-1))
        depth.add_(active)
        torch.where(active.unsqueeze(-1), state, state)
        return active > halted

    return _timed(merge, device)


def _compaction_time(model: LoopLM, rows: int) -> float:
    device, cfg = model.device, model.config
    state = torch.randn(rows, cfg.d_model, device=device).to(model.dtype)
    active = torch.arange(rows, device=device) % 2 == 0
    width = cfg.d_model

    def compaction():
        picked = active.nonzero().squeeze(1)
        picked.numel()
        gathered = state.index_select(0, picked)
        for _ in range(4):  # state, R, eps, loops in; state, R, active, depth out
            state.index_select(0, picked)
            state.index_copy(0, picked, gathered)
        return torch.zeros(rows, width, device=device).index_add_(0, picked, gathered.float())

    return _timed(compaction, device)


class FormPolicy:
    """Chooses masked or compacted per (layer, step); `fixed` forces one form (tests,
    benchmarks); learns survival rates from the depths of earlier steps."""

    def __init__(self, num_layers: int, max_loops: int, fixed: str = "auto",
                 cost_model: CostModel | None = None, decay: float = 0.9) -> None:
        if fixed not in FORMS:
            raise ValueError(f"loop form must be one of {list(FORMS)}, got {fixed!r}")
        self.fixed = fixed
        self.cost_model = cost_model
        self.decay = decay
        # survival[l][t-1]: fraction of a step's tokens still looping at (l, t); start at 1
        self.survival = [[1.0] * max_loops for _ in range(num_layers)]
        # empty[l][t-1]: share of engine steps with no token left at (l, t); start at 0
        self.empty = [[0.0] * max_loops for _ in range(num_layers)]

    def form(self, layer: int, step: int, total: int) -> str:
        if self.fixed != "auto":
            return self.fixed
        if step == 1 or self.cost_model is None:
            return MASKED  # every token runs the first step
        predicted = total * self.survival[layer][step - 1]
        pays = self.cost_model.compacted_pays(total, predicted, self.empty[layer][step - 1])
        return COMPACTED if pays else MASKED

    def observe(self, active_counts: list[list[int]], total: int) -> None:
        """Active tokens per (layer, step) of a finished engine step of `total` tokens."""
        if total == 0:
            return
        for layer, counts in enumerate(active_counts):
            for t, count in enumerate(counts):
                old = self.survival[layer][t]
                self.survival[layer][t] = self.decay * old + (1 - self.decay) * count / total
                old = self.empty[layer][t]
                self.empty[layer][t] = self.decay * old + (1 - self.decay) * (count == 0)
