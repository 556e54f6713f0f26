"""RMS normalisation of the serving path's rows, x / sqrt(mean(x^2) + eps), in the form that
costs least where it runs.

- **fused**: `F.rms_norm`, one kernel on a GPU (and what `torch.compile` fuses further);
- **composed**: `x * rsqrt(|x|^2 / D + eps)` from `vector_norm`, `addcmul` and `rsqrt_` on
  the [..., 1] row norms. On a CPU, torch's `rms_norm` runs as six generic ops (`pow`,
  `mean` as `sum` and `div_`, `add_`, `rsqrt`, `mul`, a `type_as`): a quarter of the
  bundled model's decode time at batch 8 (profiled). The composed form's first op reads
  each row once, and the rest work on one number a row. Same value to fp32 rounding (eps
  included), in the input's dtype for fp32 inputs; kept to fp32 models, where a bf16 one
  would pay a cast kernel for it.

`RowNorm.for_device` picks: composed for an fp32 model on a CPU, fused everywhere else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

FUSED, COMPOSED = "fused", "composed"


class RowNorm:
    """Normalises over the last dim; a weight, where given, scales the result."""

    def __init__(self, eps: float, device: torch.device, form: str = FUSED) -> None:
        if form not in (FUSED, COMPOSED):
            raise ValueError(f"row norm form must be '{FUSED}' or '{COMPOSED}', got {form!r}")
        self.eps = eps
        self.form = form
        self._eps = torch.tensor([eps], dtype=torch.float32, device=device)  # addcmul's input

    @classmethod
    def for_device(cls, eps: float, device: torch.device, dtype: torch.dtype) -> RowNorm:
        cpu_fp32 = torch.device(device).type == "cpu" and dtype == torch.float32
        return cls(eps, device, COMPOSED if cpu_fp32 else FUSED)

    def fused(self) -> RowNorm:
        """The same norm in the fused form (what a GPU runs)."""
        return RowNorm(self.eps, self._eps.device, FUSED)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., D] -> [..., D]."""
        if self.form == FUSED:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # [..., 1]
        scale = torch.addcmul(self._eps, norms, norms, value=1.0 / x.shape[-1]).rsqrt_()
        return x * scale if weight is None else (x * scale).mul_(weight)


@contextlib.contextmanager
def fused_norms(blocks: list) -> Iterator[None]:
    """Run serving blocks (anything with a `norm: RowNorm`) with fused norms for a while:
    what op counts on a CPU use, to count the kernels a GPU would launch."""
    saved = [block.norm for block in blocks]
    try:
        for block, norm in zip(blocks, saved, strict=True):
            block.norm = norm.fused()
        yield
    finally:
        for block, norm in zip(blocks, saved, strict=True):
            block.norm = norm
