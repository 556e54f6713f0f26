"""The in-place backends' start-up check: their compiled kernel against the gather path.

`--attention-backend flex` runs a kernel torch compiles for this machine, pool shape,
dtype and block size. torch 2.13's CPU kernel was measured to answer wrongly at block size
8 (fp32 and bf16, errors of order 1 to 1,000; sizes 4, 16 and 32 were right) on an AVX2
machine, so start-up compiles the kernel on the real pool and holds it to the gather
path's arithmetic before any request is served; a kernel that differs ends start-up with
a ConfigError naming the flags that avoid it. `--attention-backend triton` (a kernel
Triton compiles for the GPU at hand) gets the same check.
"""

from __future__ import annotations

import torch

from engine.errors import ConfigError
from engine.flex_paged import FlexDecode
from engine.paged_attention import decode_attention, gather_blocks
from engine.triton_paged import TritonDecode


def probe(kernel: FlexDecode | TritonDecode, cache: torch.Tensor, scratch: int,
          heads: int) -> None:
    """Compile the kernel for one decode row, then two (one graph for a single row, one for
    any number), over block `scratch` of one layer's `cache` [blocks, N, bs, 2, Hkv, hd]
    filled with random k/v (restored after), `heads` query heads; raises ConfigError if it
    differs from the gather path."""
    saved = cache[scratch].clone()
    gen = torch.Generator().manual_seed(0)
    block_size, head_dim = cache.shape[2], cache.shape[-1]
    try:
        cache[scratch] = torch.randn(cache.shape[1:], generator=gen).to(cache)
        for contexts in ([block_size], [block_size, max(1, block_size - 1)]):
            rows = len(contexts)
            blocks = torch.full((rows, 1), scratch, dtype=torch.long, device=cache.device)
            lengths = torch.tensor(contexts, device=cache.device)
            q = torch.randn(rows, heads, head_dim, generator=gen).to(cache)  # [n, H, hd]
            got = kernel.attend_table(cache, 0, q, blocks, lengths)  # [n, H * hd]
            kv = gather_blocks(cache, 0, blocks, None)  # [n, bs, 2, Hkv, hd]
            valid = torch.arange(block_size, device=cache.device)[None, :] < lengths[:, None]
            check(got, decode_attention(q, kv[:, :, 0], kv[:, :, 1], valid), block_size,
                  kernel.name)
    finally:
        cache[scratch] = saved


def check(got: torch.Tensor, want: torch.Tensor, block_size: int, backend: str = "flex"
          ) -> None:
    """Raise ConfigError unless the kernel's answer `got` is the gather answer `want` (to
    1e-4 in fp32, 3e-2 in a 16-bit dtype, relative to the answer's size)."""
    tolerance = 1e-4 if want.dtype == torch.float32 else 3e-2
    error = float((got.float() - want.float()).abs().max())
    if not error <= tolerance * (1.0 + float(want.float().abs().max())):  # NaN fails too
        dtype = str(want.dtype).removeprefix("torch.")
        raise ConfigError(
            f"attention_backend '{backend}' computes wrong attention on this machine at "
            f"block_size {block_size} in {dtype} (largest difference from the gather path "
            f"{error:.3g}: a fault of the compiled kernel); run with "
            f"--attention-backend gather, or with another --block-size")
