"""Decode attention over the paged pool in place, with a Triton kernel (`--attention-backend
triton`): each row reads its own blocks up to its own length, on the device.

The gather path copies every decode row's whole padded context out of the pool and SDPA
reads the copy (three passes over the KV bytes, the same for a row that has halted); this
kernel reads each row's keys where they lie, once, and only up to the row's length. In the
masked form a halted row's length is set to 1 (`AttentionPlan.attend`'s `looping`), so it
reads one key instead of its context: at long contexts the KV reads are most of a decode
step's bytes, and with this they follow the loops actually spent. Its output is finite
(position 0's value) and never read: a halted row's state is unread and its weight is 0
(`engine/loop_step.py`).

One program per (row, kv head): its G = H / Hkv query heads [G, hd] against keys in tiles
of `BLOCK_N` positions (each position's block from the row's table), with an online
softmax in fp32. Fixed grid, lengths read on the device: no host sync, capturable in a
CUDA graph. Prefill chunks keep the gather path.

On a CPU the kernel runs only under Triton's interpreter (`TRITON_INTERPRET=1`), which is
how the CPU tests hold it to the gather path; a GPU run holds it to the gather path at
start-up (`engine/flex_probe.py`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch

from engine.errors import ConfigError
from engine.fused_chains import launch_counted

BLOCK_N = 64  # key positions per tile


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _kernel() -> Callable:
    """The jitted kernel, made on first use (Triton reads TRITON_INTERPRET when it is)."""
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode(q_ptr, pool_ptr, tables_ptr, lengths_ptr, out_ptr, plane, scale,
                     stride_qn, stride_qh, stride_pb, stride_pp, stride_ps, stride_pkv,
                     stride_ph, stride_tn, stride_on, stride_oh,
                     GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        length = tl.load(lengths_ptr + row)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM)
        heads = kv_head * GROUP + g  # [G] query heads of this kv head
        q = tl.load(q_ptr + row * stride_qn + heads[:, None] * stride_qh + d[None, :],
                    mask=(g < GROUP)[:, None], other=0.0).to(tl.float32)  # [G, hd]
        best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for start in range(0, length, TILE):
            n = start + tl.arange(0, TILE)  # [TILE] key positions
            valid = n < length
            block = tl.load(tables_ptr + row * stride_tn + n // BLOCK_SIZE, mask=valid,
                            other=0).to(tl.int64)
            base = (block * stride_pb + plane * stride_pp + (n % BLOCK_SIZE) * stride_ps
                    + kv_head * stride_ph)  # [TILE] element offset of each key
            k = tl.load(pool_ptr + base[:, None] + d[None, :], mask=valid[:, None],
                        other=0.0).to(tl.float32)  # [TILE, hd]
            v = tl.load(pool_ptr + base[:, None] + stride_pkv + d[None, :],
                        mask=valid[:, None], other=0.0).to(tl.float32)  # [TILE, hd]
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G, TILE]
            s = tl.where(valid[None, :], s, float("-inf"))
            new_best = tl.maximum(best, tl.max(s, axis=1))  # finite: length >= 1
            rescale = tl.exp(best - new_best)
            p = tl.exp(s - new_best[:, None])  # [G, TILE]
            total = total * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            best = new_best
        out = acc / total[:, None]
        tl.store(out_ptr + row * stride_on + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])

    return paged_decode


class TritonDecode:
    """The decode rows' attention of one (layer, plane) through the Triton kernel."""

    name = "triton"

    def __init__(self, device: torch.device, head_dim: int) -> None:
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("attention_backend 'triton' needs a CUDA device (on a CPU it "
                              "runs only under TRITON_INTERPRET=1, for tests); run with "
                              "--attention-backend gather")
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise ConfigError("attention_backend 'triton' needs the triton package; run "
                              "with --attention-backend gather") from exc
        if head_dim & (head_dim - 1):
            raise ConfigError(f"attention_backend 'triton' needs a power-of-two head_dim, "
                              f"got {head_dim}; run with --attention-backend gather")

    @staticmethod
    def attend(cache: torch.Tensor, plane: int, q: torch.Tensor, blocks: torch.Tensor,
               lengths: torch.Tensor) -> torch.Tensor:
        """q [n, H, hd] of rows that read `blocks` [n, W] of plane `plane` of `cache`
        [num_blocks, N, bs, 2, Hkv, hd] up to `lengths` [n] (each >= 1) -> [n, H * hd]."""
        rows, heads, head_dim = q.shape
        kv_heads = cache.shape[4]
        group = heads // kv_heads
        q = q if q.stride(-1) == 1 else q.contiguous()
        blocks = blocks if blocks.stride(-1) == 1 else blocks.contiguous()
        out = torch.empty(rows, heads, head_dim, dtype=q.dtype, device=q.device)
        if rows == 0:
            return out.view(0, heads * head_dim)
        launch_counted("triton.paged_decode", lambda: _kernel()[(rows, kv_heads)](
            q, cache, blocks, lengths, out, plane, head_dim ** -0.5,
            q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2),
            cache.stride(3), cache.stride(4), blocks.stride(0), out.stride(0), out.stride(1),
            GROUP=group, GROUP_PAD=_next_power_of_two(group), HEAD_DIM=head_dim,
            BLOCK_SIZE=cache.shape[2], TILE=BLOCK_N))
        return out.view(rows, heads * head_dim)

    attend_table = attend  # the call `flex_probe` makes of either in-place kernel
