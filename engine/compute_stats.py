"""Per-request compute statistics: raw sums that merge exactly, and the usage summary.

The engine adds each step's loops, gate activity and FLOPs to the request's tracker; a
finished request hands out a frozen `ComputeSummary` of the raw sums. A request's choices
(n > 1) and the prompts of one HTTP request merge by adding raw sums, so nothing is ever
re-averaged; the per-token means are derived properties.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ComputeSummary:
    """What a request (or several, merged) cost: `usage.compute` of DESIGN section 6."""

    max_loops: int
    tokens: int  # tokens that went through the trunk
    loop_sums: tuple[float, ...]  # [L] loop steps summed over tokens
    gate_sums: tuple[float, ...]  # [L] mean memory gate summed over tokens
    flops: float
    flops_max_depth: float

    def merge(self, other: ComputeSummary) -> ComputeSummary:
        """Exact: the raw sums add (max_loops is the larger of the two)."""
        return ComputeSummary(
            max(self.max_loops, other.max_loops), self.tokens + other.tokens,
            tuple(a + b for a, b in zip(self.loop_sums, other.loop_sums, strict=True)),
            tuple(a + b for a, b in zip(self.gate_sums, other.gate_sums, strict=True)),
            self.flops + other.flops, self.flops_max_depth + other.flops_max_depth)

    @property
    def loops_per_layer(self) -> list[float]:
        return [s / max(self.tokens, 1) for s in self.loop_sums]

    @property
    def mean_loops_per_token(self) -> float:
        loops = self.loops_per_layer
        return sum(loops) / len(loops)

    @property
    def memory_gate_per_layer(self) -> list[float]:
        return [s / max(self.tokens, 1) for s in self.gate_sums]

    @property
    def compute_saved(self) -> float:
        return 1.0 - self.flops / self.flops_max_depth if self.flops_max_depth else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The HTTP layout (`usage.compute`)."""
        return {"max_loops": self.max_loops, "mean_loops_per_token": self.mean_loops_per_token,
                "loops_per_layer": self.loops_per_layer,
                "memory_gate_per_layer": self.memory_gate_per_layer,
                "flops": int(self.flops), "flops_max_depth": int(self.flops_max_depth),
                "compute_saved": self.compute_saved}


class ComputeTracker:
    """Per-request running totals (mutable while the request runs)."""

    def __init__(self, cfg: ModelConfig, max_loops: int) -> None:
        self.cfg = cfg
        self.max_loops = max_loops
        self.tokens = 0
        self.loop_sums = [0.0] * cfg.n_layers
        self.gate_sums = [0.0] * cfg.n_layers
        self.flops = 0.0
        self.flops_max_depth = 0.0

    def add(self, tokens: int, loop_sums: list[float], gate_sums: list[float], flops: float,
            flops_max_depth: float) -> None:
        self.tokens += tokens
        self.loop_sums = [a + b for a, b in zip(self.loop_sums, loop_sums, strict=True)]
        self.gate_sums = [a + b for a, b in zip(self.gate_sums, gate_sums, strict=True)]
        self.flops += flops
        self.flops_max_depth += flops_max_depth

    def add_logits(self, flops: float) -> None:
        """The LM head of one sampled position (the same at any depth)."""
        self.flops += flops
        self.flops_max_depth += flops

    def summary(self) -> ComputeSummary:
        return ComputeSummary(self.max_loops, self.tokens, tuple(self.loop_sums),
                              tuple(self.gate_sums), self.flops, self.flops_max_depth)
