"""The PNG report of a benchmark (matplotlib, drawn off-screen), one colour per run of a sweep:

    [ TTFT and E2E latency CDFs ] [ TPOT and ITL CDFs              ]
    [ output tokens/s over time ] [ mean loops per layer (loopserve) ]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clients.bench.metrics import RequestResult, latencies, timeline


def cdf(ax: Any, values_s: Sequence[float], label: str, style: str, color: str) -> None:
    if not values_s:
        return
    ms = np.sort(np.asarray(values_s)) * 1000.0
    ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post", linestyle=style,
            color=color, label=label)


def latency_panel(ax: Any, runs: Sequence[tuple[str, list[RequestResult]]],
                  names: tuple[str, str], colors: list[str]) -> None:
    for (label, results), color in zip(runs, colors, strict=False):
        values = latencies(results)
        for name, style in zip(names, ("-", "--"), strict=True):
            cdf(ax, values[name], f"{name.upper()} {label}", style, color)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests" if "ttft" in names else "fraction")
    ax.set_title(" and ".join(n.upper() for n in names) + " (CDF)")
    if ax.lines:
        ax.set_xscale("log")
        ax.legend(fontsize="x-small")
    ax.grid(alpha=0.3)


def throughput_panel(ax: Any, runs: Sequence[tuple[str, list[RequestResult]]],
                     colors: list[str]) -> None:
    """One bin width for every run (1 s, or 1/40 of the longest run when shorter than 40 s),
    so that short runs do not look spikier than long ones."""
    longest = max((r.end for _, results in runs for r in results), default=1.0)
    bin_s = 1.0 if longest >= 40 else max(longest, 1e-3) / 40
    for (label, results), color in zip(runs, colors, strict=False):
        edges, tokens, _ = timeline(results, bin_s)
        ax.stairs(tokens, edges, color=color, label=label)
    ax.set_xlabel("seconds from the run's start")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Output throughput over time ({bin_s:.3g} s bins)")
    ax.legend(fontsize="x-small")
    ax.grid(alpha=0.3)


def loops_panel(ax: Any, runs: Sequence[tuple[str, dict[str, Any]]], colors: list[str]) -> None:
    with_loops = [(label, s) for label, s in runs if s.get("loops_per_layer")]
    if not with_loops:
        ax.text(0.5, 0.5, "no usage.compute in the responses", ha="center", va="center")
        ax.set_axis_off()
        return
    width = 0.8 / len(with_loops)
    for i, ((label, summary), color) in enumerate(zip(with_loops, colors, strict=False)):
        layers = summary["loops_per_layer"]
        x = np.arange(len(layers)) + (i - (len(with_loops) - 1) / 2) * width
        ax.bar(x, layers, width, color=color,
               label=f"{label}: {100 * summary['compute_saved']:.0f}% saved")
    ax.axhline(with_loops[0][1]["max_loops"], color="grey", linestyle=":", label="max loops")
    ax.set_xticks(np.arange(len(with_loops[0][1]["loops_per_layer"])))
    ax.set_xlabel("layer")
    ax.set_ylabel("mean loop steps per token")
    ax.set_title("Loops per layer (from usage.compute)")
    ax.legend(fontsize="x-small")


def write_report(path: str | Path, runs: Sequence[tuple[str, list[RequestResult],
                                                        dict[str, Any]]],
                 title: str) -> Path:
    """Draw the four panels for `runs` (label, per-request results, summary) into `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = [f"C{i % 10}" for i in range(len(runs))]
    results = [(label, res) for label, res, _ in runs]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    latency_panel(axes[0, 0], results, ("ttft", "e2el"), colors)
    latency_panel(axes[0, 1], results, ("tpot", "itl"), colors)
    throughput_panel(axes[1, 0], results, colors)
    loops_panel(axes[1, 1], [(label, s) for label, _, s in runs], colors)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
