"""The matmul floor of a generate run: its weight matmuls alone, timed on the same device.

A dense decoder's `generate(batch B, prompt P, output O)` multiplies every weight matrix by
the B*P prompt rows once (the prefill, whose last rows give the first token) and by B rows
for each of the O - 1 further tokens; the LM head sees B rows per token. Attention, norms,
sampling and every byte of host work come on top. This module times exactly those matmuls,
as `F.linear` on the model's own weights (the shapes any engine of this model must run), so
a benchmark can say how close an engine is to the floor and how far *any* engine of the same
weights could get ahead of another: `peer_seconds / floor_seconds` is the largest speed-up
over the peer that removing every non-matmul cost would give.

It is a bound where the matmuls themselves take the time: on a CPU at any batch, and on a
GPU at large batch. On a GPU at small batch these eager `F.linear` calls are bound by their
launches, which a CUDA-graph engine does not pay, so there the floor is only a reference.
Dense models only (max_loops = 1, no memory), as the transformers comparison uses.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from benchmarks.machine import sync
from model.looplm import LoopLM


def weight_matrices(model: LoopLM) -> list[torch.Tensor]:
    """Every [out, in] weight one dense forward multiplies by, in order (LM head last)."""
    if model.config.max_loops != 1 or model.config.has_memory:
        raise ValueError("the matmul floor is for dense models (max_loops=1, no memory)")
    mats = []
    for block in model.layers:
        mats += [block.qkv.weight, block.attn_out.weight, block.mlp.gate_up.weight,
                 block.mlp.down.weight]
    return [*mats, model.lm_head.weight]


@torch.inference_mode()
def matmul_floor_seconds(model: LoopLM, batch: int, prompt_len: int, output_len: int,
                         device: str, repeats: int = 2) -> float:
    """Best-of-`repeats` time of the run's weight matmuls (prefill rows and decode rows)."""
    mats = weight_matrices(model)
    rows = [(batch * prompt_len, mats[:-1]), (batch, mats[-1:])]  # prefill; first token
    rows += [(batch, mats)] * (output_len - 1)  # each further decode step
    inputs = {n: {w.shape[1]: torch.randn(n, w.shape[1], dtype=w.dtype, device=w.device)
                  for w in mats} for n, _ in rows}
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for n, group in rows:
            for w in group:
                F.linear(inputs[n][w.shape[1]], w)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best
