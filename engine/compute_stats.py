"""Per-request compute statistics: raw sums that merge exactly, and the usage summary.

The engine adds each step's loops, gate activity and FLOPs to the request's tracker; a
request's choices (n > 1) and the prompts of one HTTP request merge by adding raw sums, so
nothing is ever re-averaged.
"""

from __future__ import annotations

from model.config import ModelConfig


class ComputeTracker:
    """Per-request running totals that become `usage.compute` (DESIGN section 6)."""

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

    def merge(self, other: ComputeTracker) -> None:
        self.add(other.tokens, other.loop_sums, other.gate_sums, other.flops,
                 other.flops_max_depth)

    def summary(self) -> dict:
        tokens = max(self.tokens, 1)
        loops = [s / tokens for s in self.loop_sums]
        saved = 1.0 - self.flops / self.flops_max_depth if self.flops_max_depth else 0.0
        return {
            "max_loops": self.max_loops,
            "mean_loops_per_token": sum(loops) / len(loops),
            "loops_per_layer": loops,
            "memory_gate_per_layer": [s / tokens for s in self.gate_sums],
            "flops": int(self.flops),
            "flops_max_depth": int(self.flops_max_depth),
            "compute_saved": saved,
        }
