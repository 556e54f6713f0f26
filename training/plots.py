"""The evaluation figure: loops and memory gates per layer, loops against difficulty, and the
threshold trade-off. matplotlib is imported here only (it is an optional dependency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_eval(report: dict[str, Any], path: Path) -> None:
    """Four panels from an eval.json report, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    _loops_per_layer(axes[0][0], report)
    _gates_per_layer(axes[0][1], report)
    _loops_by_difficulty(axes[1][0], report)
    _threshold_sweep(axes[1][1], report)
    fig.suptitle(f"{Path(report['model']).name}: {report['split']} split, adaptive semantics "
                 f"at threshold {report['threshold']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _loops_per_layer(ax: Any, report: dict[str, Any]) -> None:
    layers = range(1, len(report["loops_per_layer"]) + 1)
    width = 0.38
    ax.bar([x - width / 2 for x in layers], report["loops_per_layer"], width, label="all tokens")
    ax.bar([x + width / 2 for x in layers], report["answer_loops_per_layer"], width,
           label="answer positions")
    ax.set(xlabel="layer", ylabel="mean loop steps", title="Loops per layer",
           ylim=(0, report["max_loops"] + 0.2), xticks=list(layers))
    ax.legend()


def _gates_per_layer(ax: Any, report: dict[str, Any]) -> None:
    gates = report["memory_gate_per_layer"]
    layers = range(1, len(gates["local"]) + 1)
    width = 0.38
    ax.bar([x - width / 2 for x in layers], gates["local"], width, label="local bank")
    ax.bar([x + width / 2 for x in layers], gates["global"], width, label="global bank")
    ax.set(xlabel="layer", ylabel="mean gate", title="Memory-gate activity per layer",
           ylim=(0, 1), xticks=list(layers))
    ax.legend()


def _loops_by_difficulty(ax: Any, report: dict[str, Any]) -> None:
    for task, cells in report["answer_loops_by_difficulty"].items():
        if task == "fact":
            ax.axhline(cells["1"], linestyle=":", color="gray", label="fact")
            continue
        levels = sorted(cells, key=int)
        ax.plot([int(d) for d in levels], [cells[d] for d in levels], marker="o", label=task)
    ax.set(xlabel="difficulty (digits; expr: operators)", ylabel="mean loops per layer",
           title="Loops at answer positions vs difficulty", xticks=[1, 2, 3, 4])
    ax.legend()


def _threshold_sweep(ax: Any, report: dict[str, Any]) -> None:
    rows = report["threshold_sweep"]
    eps = [r["threshold"] for r in rows]
    ax.plot(eps, [r["accuracy"] for r in rows], marker="o", label="exact match (teacher-forced)")
    ax.plot(eps, [r["agreement"] for r in rows], marker="^", label="agreement with exact")
    ax.plot(eps, [r["compute_saved"] for r in rows], marker="s", label="compute saved")
    ax.axvline(report["threshold"], linestyle=":", color="gray", label="default threshold")
    ax.set(xlabel="halting threshold", ylabel="fraction", title="Threshold trade-off",
           ylim=(0, 1))
    ax.legend()


def plot_training(records: list[dict[str, Any]], path: Path) -> None:
    """Loss, validation exact match and expected loops per layer over a run's log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("event") == "train"]
    val = [r for r in records if r.get("event") == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot([r["step"] for r in train], [r["ce"] for r in train])
    axes[0].set(xlabel="step", ylabel="answer cross-entropy", yscale="log", title="Training loss")
    for task in ("add2", "add3", "fact", "sub3", "mul3", "expr"):
        if val and task in val[-1]["adaptive_acc"]:
            axes[1].plot([r["step"] for r in val], [r["adaptive_acc"][task] for r in val],
                         marker="o", label=task)
    axes[1].set(xlabel="step", ylabel="exact match (teacher-forced)", ylim=(0, 1),
                title="Validation, adaptive semantics")
    axes[1].legend()
    layers = len(train[0]["expected_steps"]) if train else 0
    for layer in range(layers):
        axes[2].plot([r["step"] for r in train], [r["expected_steps"][layer] for r in train],
                     label=f"layer {layer + 1}")
    axes[2].set(xlabel="step", ylabel="expected loop steps", title="Loops per layer (training)")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
