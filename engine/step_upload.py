"""One upload per engine step: every integer and float input of the step is packed on the
host into one int64 tensor, copied to the device once (from a persistent pinned buffer,
non-blocking, on CUDA), and handed back as views.

Nothing here waits for the device: the pinned buffer is reused only after the previous
step's results were read back, which completes its upload first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StepUpload:
    """`add(name, ints, shape)` / `add_floats(...)` on the host, then `upload()`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: torch.Tensor | None = None
        self._buffer: torch.Tensor | None = None  # persistent device copy
        self._reset()

    def _reset(self) -> None:
        self._ints: list[int] = []
        self._fields: list[tuple[str, int, int, tuple[int, ...], bool]] = []

    def add(self, name: str, values: Sequence[int], shape: tuple[int, ...] | None = None
            ) -> None:
        start = len(self._ints)
        self._ints.extend(values)
        self._fields.append((name, start, len(self._ints), shape or (len(values),), False))

    def add_floats(self, name: str, values: Sequence[float]) -> None:
        """fp32 values, carried as their float64 bit patterns."""
        bits = torch.tensor(values, dtype=torch.float64).view(torch.int64).tolist()
        start = len(self._ints)
        self._ints.extend(bits)
        self._fields.append((name, start, len(self._ints), (len(values),), True))

    def upload(self) -> dict[str, torch.Tensor]:
        host = torch.tensor(self._ints, dtype=torch.int64)
        device = self._to_device(host)
        out = {}
        for name, start, end, shape, is_float in self._fields:
            part = device[start:end]
            out[name] = (part.view(torch.float64).float() if is_float else part).view(shape)
        self._reset()
        return out

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return host.to(self.device)  # the same tensor on CPU
        size = host.numel()
        if self._pinned is None or self._pinned.numel() < size:
            capacity = max(size, 2 * (self._pinned.numel() if self._pinned is not None else 0),
                           1 << 14)
            self._pinned = torch.empty(capacity, dtype=torch.int64).pin_memory()
            self._buffer = torch.empty(capacity, dtype=torch.int64, device=self.device)
        self._pinned[:size].copy_(host)
        self._buffer[:size].copy_(self._pinned[:size], non_blocking=True)
        return self._buffer[:size]
