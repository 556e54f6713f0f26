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

Inductor asserts that the mask's key width spans the whole key sequence (num_blocks * N
blocks), though a row only reads its first W. Dense, that would be two [n, num_blocks * N]
index tensors a call (~0.4 GB at an H200-sized pool and 256 rows); instead each is a
strided view of its [n, W] rows that reads on into the next row and a zero tail past the
last: num_blocks * N + n * W entries, and only the first W of a row are ever read.

Start-up holds the compiled kernel to the gather path on the real pool and refuses a
kernel that answers wrongly (`engine/flex_probe.py` says where torch's does).

The compiled kernel is one per process (dynamic row counts; a new pool shape, dtype or
block size compiles again): its mask reads one module-level offsets buffer per device, since
a mask closing over a per-engine tensor recompiles for every engine.

Expected to fail on CUDA as it stands (read in inductor's source, not run; no GPU has been
lent): each decode row is its own query block (BLOCK_SIZE (1, bs)), and Triton's flex
kernels want query blocks of at least 16 rows (and key blocks of 64 in the main kernel),
so the compile would find no valid kernel; start-up then refuses the backend naming
`--attention-backend gather`. Running it there means query blocks of 16 rows, each with
the union of its rows' blocks and a per-row membership check in the mask.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from engine.errors import ConfigError
from engine.fused_chains import counted, require_compiler

MAX_ROWS = 1 << 16  # decode rows one call can take (the offsets buffer's size)


@functools.cache
def _offsets(device: torch.device) -> torch.Tensor:
    """[MAX_ROWS] the last valid offset of each row's partial block, rewritten per call.
    A normal tensor even when first asked for inside `inference_mode` (an engine step):
    an inference tensor could not be written to by a later call outside it."""
    with torch.inference_mode(False):
        return torch.zeros(MAX_ROWS, dtype=torch.long, device=device)


@functools.cache
def _compiled() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # one graph per pool shape, dtype and block size, for one row and for many: a process
    # with several engines (tests, benchmarks) passes dynamo's default limit of 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
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


def _spanning(table: torch.Tensor, span: int) -> torch.Tensor:
    """[n, w] index rows as a [n, 1, 1, span] view (span >= w): row i's entries first, then
    row i + 1's and a zero tail, never read (each row's count stays within its w)."""
    rows, width = table.shape
    flat = table.new_zeros(rows * width + span)
    flat[:rows * width] = table.reshape(-1)
    return flat.as_strided((rows, 1, 1, span), (width, 1, 1, 1))


@dataclasses.dataclass
class FlexMask:
    """What one set of decode rows reads of one plane: the block mask and each row's last
    valid offset in its partial block. It depends on the block tables, not on the layer,
    so a step builds it once per plane and every layer's call reuses it."""

    mask: object  # torch.nn.attention.flex_attention.BlockMask
    offsets: torch.Tensor  # [n] long


class FlexDecode:
    """The decode rows' attention of one (layer, plane) through the compiled FlexAttention."""

    name = "flex"

    def __init__(self, device: torch.device, max_rows: int) -> None:
        # inductor builds C++ on a CPU, and Triton its launchers with a C compiler on a GPU
        require_compiler("attention_backend 'flex'", "--attention-backend gather")
        if device.type == "cpu":
            import torch._inductor.config as inductor_config

            inductor_config.cpp.enable_kernel_profile = True
        if max_rows > MAX_ROWS:
            raise ConfigError(f"attention_backend 'flex' takes at most {MAX_ROWS} decode "
                              f"rows a step, got max_num_seqs {max_rows}")

    @staticmethod
    def mask(cache: torch.Tensor, plane: int, blocks: torch.Tensor, contexts: torch.Tensor
             ) -> FlexMask:
        """Rows reading plane `plane` of a pool shaped like `cache`: row i reads blocks[i]
        [W] (padded past its blocks) up to position contexts[i] - 1."""
        from torch.nn.attention.flex_attention import BlockMask

        num_blocks, planes, bs = cache.shape[:3]
        rows = blocks.shape[0]
        used = (contexts + bs - 1) // bs  # [n] blocks read, the last one partial
        keyed = (blocks * planes + plane).to(torch.int32)  # [n, W] key blocks of the plane
        partial = keyed.gather(1, (used - 1)[:, None])  # [n, 1]
        span = num_blocks * planes
        mask = BlockMask.from_kv_blocks(
            torch.ones(rows, 1, 1, dtype=torch.int32, device=cache.device),
            _spanning(partial, span), (used - 1).to(torch.int32)[:, None, None],
            _spanning(keyed, span), BLOCK_SIZE=(1, bs), mask_mod=_mask_mod(cache.device, bs),
            seq_lengths=(1, span * bs), compute_q_blocks=False)
        return FlexMask(mask, (contexts - 1) % bs)

    def attend_table(self, cache: torch.Tensor, plane: int, q: torch.Tensor,
                     blocks: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """`TritonDecode.attend`'s call: rows reading `blocks` of `plane` up to `lengths`,
        with a mask built for this call."""
        return self.attend(cache, q, self.mask(cache, plane, blocks, lengths))

    def attend(self, cache: torch.Tensor, q: torch.Tensor, mask: FlexMask) -> torch.Tensor:
        """Attention [n, H * hd] of queries q [n, H, hd] over `cache`, as `mask` says."""
        num_blocks, planes, bs, _, hkv, hd = cache.shape
        length = num_blocks * planes * bs
        keys = cache.as_strided((1, hkv, length, hd), (0, hd, 2 * hkv * hd, 1),
                                storage_offset=cache.storage_offset())
        values = cache.as_strided((1, hkv, length, hd), (0, hd, 2 * hkv * hd, 1),
                                  storage_offset=cache.storage_offset() + hkv * hd)
        # the shared buffer the mask function reads (another row set may have written it)
        _offsets(cache.device)[:q.shape[0]] = mask.offsets
        out = _compiled()(q.unsqueeze(2), keys, values, block_mask=mask.mask, enable_gqa=True)
        return out.flatten(1)  # [n, H, 1, hd] -> [n, H * hd]
