"""Text rendering of a request's compute for terminals: loops per layer as a compact bar,
FLOPs with SI prefixes, compute saved.

    loops/layer ▁▃▆█  1.05 1.62 2.41 2.97  (mean 2.01 of max 3)
    FLOPs       1.84 M  of 3.10 M at full depth: 40.6% saved
"""

from __future__ import annotations

from collections.abc import Sequence

from clients.types import Compute

BARS = "▁▂▃▄▅▆▇█"


def bar(values: Sequence[float], low: float, high: float) -> str:
    """One block character per value, its height from `low` (▁) to `high` (█)."""
    span = high - low
    cells = []
    for value in values:
        level = 0.0 if span <= 0 else min(max((value - low) / span, 0.0), 1.0)
        cells.append(BARS[round(level * (len(BARS) - 1))])
    return "".join(cells)


def si(value: float, unit: str = "") -> str:
    """1234567 -> '1.23 M'."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def format_compute(compute: Compute) -> str:
    """Two or three lines describing what a request spent."""
    loops = compute.loops_per_layer
    numbers = " ".join(f"{v:.2f}" for v in loops)
    lines = [f"loops/layer {bar(loops, 1.0, compute.max_loops)}  {numbers}  "
             f"(mean {compute.mean_loops_per_token:.2f} of max {compute.max_loops})",
             f"FLOPs       {si(compute.flops)}  of {si(compute.flops_max_depth)} at full depth: "
             f"{100 * compute.compute_saved:.1f}% saved"]
    gates = compute.memory_gate_per_layer
    if gates and any(gates):
        lines.append(f"memory gate {bar(gates, 0.0, 1.0)}  "
                     + " ".join(f"{g:.2f}" for g in gates))
    return "\n".join(lines)
