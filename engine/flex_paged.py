"""Decode attention over the paged pool in place, with FlexAttention (`--attention-backend
flex`): no row's context is copied.

One layer's pool `[num_blocks, N, bs, 2, Hkv, hd]` is read as a single key sequence
`[1, Hkv, num_blocks * N * bs, hd]`: key position s is (block s // (N bs), plane
s // bs % N, offset s % bs), and both k (at 2 Hkv hd s) and v (Hkv hd further) have a
uniform stride, so `as_strided` views them without a copy. A decode row of plane t reads
the key blocks `block * N + t` of its block table: all but its last are full (no mask
evaluated), the last is partial, masked to offsets up to (context - 1) % bs. The block
mask carries these per call as device tensors, built without a host sync (the CPU tests
count none), as a CUDA graph needs: capture is not yet verified on a GPU. Prefill chunks
keep the gather path of `engine/paged_attention.py`.

Cost to measure on a GPU: inductor asserts the mask's key width spans the whole key
sequence, so each call writes two [n, num_blocks * N] int32 index tensors, mostly padding:
at an H200-sized pool (about 70k blocks of 16, 3 planes) and 256 rows that is ~0.4 GB a
call. A narrower mask (a strided view over the [n, W] tables, or larger key blocks) is the
next thing to try there.

The compiled kernel is one per process (dynamic row counts; a new pool shape, dtype or
block size compiles again): its mask reads one module-level offsets buffer per device, since
a mask closing over a per-engine tensor recompiles for every engine.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from engine.errors import ConfigError
from engine.fused_chains import counted, require_compiler

MAX_ROWS = 1 << 16  # decode rows one call can take (the offsets buffer's size)


@functools.cache
def _offsets(device: torch.device) -> torch.Tensor:
    """[MAX_ROWS] the last valid offset of each row's partial block, rewritten per call."""
    return torch.zeros(MAX_ROWS, dtype=torch.long, device=device)


@functools.cache
def _compiled() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # counted: the op counter sees its launches (on CPU, with kernel profiling on)
    return counted(torch.compile(flex_attention, fullgraph=True, dynamic=True))


@functools.cache
def _mask_mod(device: torch.device, block_size: int):
    """One mask function per (device, block size), so the compiled kernel's guards hold:
    a key of a row's partial block counts up to that row's offset."""
    offsets = _offsets(device)

    def in_partial_block(b, h, q_idx, kv_idx):
        return kv_idx % block_size <= offsets[b]

    return in_partial_block


class FlexDecode:
    """The decode rows' attention of one (layer, plane) through the compiled FlexAttention."""

    def __init__(self, device: torch.device, max_rows: int) -> None:
        # inductor builds C++ on a CPU, and Triton its launchers with a C compiler on a GPU
        require_compiler("attention_backend 'flex'", "--attention-backend gather")
        if device.type == "cpu":
            import torch._inductor.config as inductor_config

            inductor_config.cpp.enable_kernel_profile = True
        if max_rows > MAX_ROWS:
            raise ConfigError(f"attention_backend 'flex' takes at most {MAX_ROWS} decode "
                              f"rows a step, got max_num_seqs {max_rows}")

    def attend(self, cache: torch.Tensor, plane: int, blocks: torch.Tensor,
               contexts: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Attention [n, H * hd] of queries q [n, H, hd] over plane `plane` of `cache`, row i
        reading blocks[i] [W] (padded past its blocks) up to position contexts[i] - 1."""
        from torch.nn.attention.flex_attention import BlockMask

        num_blocks, planes, bs, _, hkv, hd = cache.shape
        rows, width = blocks.shape
        length = num_blocks * planes * bs
        keys = cache.as_strided((1, hkv, length, hd), (0, hd, 2 * hkv * hd, 1),
                                storage_offset=cache.storage_offset())
        values = cache.as_strided((1, hkv, length, hd), (0, hd, 2 * hkv * hd, 1),
                                  storage_offset=cache.storage_offset() + hkv * hd)
        used = (contexts + bs - 1) // bs  # [n] blocks read, the last one partial
        # the mask's key width must cover the whole key sequence: pad with block 0, unread
        full = blocks.new_zeros(rows, num_blocks * planes, dtype=torch.int32)  # [n, nb N]
        full[:, :width] = blocks * planes + plane
        partial = torch.zeros_like(full)  # [n, nb N]: the partial block first
        partial[:, :1] = full.gather(1, (used - 1)[:, None])
        _offsets(cache.device)[:rows] = (contexts - 1) % bs
        mask = BlockMask.from_kv_blocks(
            torch.ones(rows, 1, 1, dtype=torch.int32, device=cache.device),
            partial[:, None, None], (used - 1).to(torch.int32)[:, None, None],
            full[:, None, None], BLOCK_SIZE=(1, bs), mask_mod=_mask_mod(cache.device, bs),
            seq_lengths=(1, length), compute_q_blocks=False)
        out = _compiled()(q.unsqueeze(2), keys, values, block_mask=mask, enable_gqa=True)
        return out.flatten(1)  # [n, H, 1, hd] -> [n, H * hd]
