"""Table and figure of the paper miniature (benchmarks/paper_miniature.py's JSON files).

    python -m benchmarks.paper_miniature_report        # writes paper_miniature.md and .png

Numbers are means over the seeds found, with the spread (max - min) after a +-; exact match
is teacher-forced on the held-out test split in served (adaptive) semantics. The hand-written
part of the page (after the notes marker) survives a rewrite.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.paper_miniature import RESULTS, VARIANTS
from training.card import kept_notes
from training.data import TASKS

PAGE = Path("benchmarks/paper_miniature.md")
# the table's columns: name -> the cells pooled into it (weighted by their sizes)
COLUMNS = {"add 2": ("add2",), "add 3": ("add3",), "add 4": ("add4",),
           "sub": ("sub1", "sub2", "sub3", "sub4"), "mul": ("mul1", "mul2", "mul3", "mul4"),
           "expr": ("expr",), "fact": ("fact",)}


def load(results: Path) -> dict[str, list[dict[str, Any]]]:
    """{variant: [one record per seed]}, in VARIANTS order."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        runs[record["variant"]].append(record)
    return {name: runs[name] for name in VARIANTS if name in runs}


def pooled(record: dict[str, Any], cells: tuple[str, ...], semantics: str = "adaptive") -> float:
    """Exact match over the cells measured (weighted by size); nan when none was."""
    match, sizes = record[semantics]["exact_match"], record["cell_sizes"]
    present = [c for c in cells if c in sizes]
    total = sum(sizes[c] for c in present)
    return sum(match[c] * sizes[c] for c in present) / total if total else math.nan


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    """`mean +- (max - min)` over seeds; just the value for one seed."""
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) * scale:.{digits}f}"


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-variant means (and per-seed values) of everything the page shows."""
    first = records[0]
    layers = len(first["adaptive"]["loops_per_layer"])
    return {
        "label": first["label"], "seeds": sorted(r["seed"] for r in records),
        "parameters": first["parameters"], "flops": first["flops_per_token_max_depth"],
        "columns": {c: [pooled(r, cells) for r in records] for c, cells in COLUMNS.items()},
        "bpb": [r["adaptive"]["answer_bits_per_byte"] for r in records],
        "bpb_exact": [r["exact"]["answer_bits_per_byte"] for r in records],
        "bpb_by_task": {t: [r["adaptive"]["answer_bits_per_byte_by_task"][t] for r in records]
                        for t in TASKS if "answer_bits_per_byte_by_task" in first["adaptive"]},
        "loops": [statistics.fmean(r["adaptive"]["loops_per_layer"][i] for r in records)
                  for i in range(layers)],
        "gates": [[statistics.fmean(r["adaptive"]["gates_per_layer"][i][k] for r in records)
                   for k in (0, 1)] for i in range(layers)],
        "minutes": statistics.fmean(r["train_minutes"] for r in records),
        "memory": first["model_config"]["local_memory_slots"] > 0,
    }


def comparison_rows(summaries: dict[str, dict[str, Any]]) -> list[str]:
    head = ("| variant | seeds | params | MFLOPs/token (max depth) | "
            + " | ".join(f"{c} EM %" for c in COLUMNS) + " | answer bits/byte | train min |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summaries.values():
        cells = " | ".join(spread(v, 100) for v in s["columns"].values())
        rows.append(f"| {s['label']} | {len(s['seeds'])} | {s['parameters'] / 1e3:.0f}k | "
                    f"{s['flops'] / 1e6:.2f} | {cells} | {spread(s['bpb'], digits=3)} | "
                    f"{s['minutes']:.1f} |")
    return rows


def bits_rows(summaries: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| variant | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
    for s in summaries.values():
        if s["bpb_by_task"]:
            cells = " | ".join(spread(s["bpb_by_task"][t], digits=3) for t in TASKS)
            rows.append(f"| {s['label']} | {cells} |")
    return rows


def layer_rows(summaries: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| variant | mean loops per layer (first to last) | local gate per layer | "
            "global gate per layer |", "|---|---|---|---|"]
    for s in summaries.values():
        loops = " / ".join(f"{x:.2f}" for x in s["loops"])
        local = " / ".join(f"{g[0]:.3f}" for g in s["gates"]) if s["memory"] else "-"
        glob = " / ".join(f"{g[1]:.3f}" for g in s["gates"]) if s["memory"] else "-"
        rows.append(f"| {s['label']} | {loops} | {local} | {glob} |")
    return rows


def common(runs: dict[str, list[dict[str, Any]]], key: str) -> Any:
    """A setting every run shares (the page states it once); mixed runs are an error."""
    values = {r.get(key) for records in runs.values() for r in records}
    if len(values) != 1:
        raise ValueError(f"the runs differ in {key} ({sorted(map(str, values))}): compare "
                         "like with like, or keep them in separate --results folders")
    return values.pop()


def page_lines(summaries: dict[str, dict[str, Any]], steps: int, batch: int,
               per_cell: int | None) -> list[str]:
    return [
        "# A miniature of the paper's comparison", "",
        "Base (1 loop, no memory), Loop-3, Mem, Loop-3 + Mem and a dense model with 3x the "
        "layers (equal matmul FLOPs to Loop-3 at max depth), all 64 wide, trained on the "
        f"project's synthetic corpus with the same data stream, {steps} steps of batch "
        f"{batch}, mixed semantics and ponder weight 0.01 unless the name says otherwise, "
        "one CPU thread each. Measured on the held-out test split (up to "
        f"{per_cell or 'all'} distinct problems per task and difficulty in "
        "both formats, every fact in its never-trained phrasing), teacher-forced, in served "
        "semantics (adaptive, threshold 0.01). Exact match (EM) in percent and answer bits "
        "per byte are means over the seeds, ± the spread (max - min) between seeds; train "
        "min is wall time on a shared 2-core machine (another training ran on the other "
        "core), for scale only.", "",
        "```bash",
        "python -m benchmarks.paper_miniature --only base loop3 mem loop3_mem dense_iso "
        "--seeds 0 1",
        "python -m benchmarks.paper_miniature --only loop3_mem_ponder0 loop3_mem_gate3 "
        "--seeds 0",
        "python -m benchmarks.paper_miniature_report",
        "```", "",
        *comparison_rows(summaries), "",
        "Answer bits per byte by task (served semantics; lower is better; finer than exact "
        "match where most answers are still wrong):", "",
        *bits_rows(summaries), "",
        "Layer specialisation (served semantics, all real tokens; gates are the mean "
        "sigmoid gate on the local and global memory reads):", "",
        *layer_rows(summaries), "",
        "![paper miniature](paper_miniature.png)", "",
    ]


def plot(summaries: dict[str, dict[str, Any]], path: Path) -> None:
    """Bits per byte by task, exact match, loops and gates per layer; one colour a variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(VARIANTS)}
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    _plot_bars(axes[0][0], summaries, colours, {t: [s["bpb_by_task"].get(t, [math.nan])
                                                    for s in summaries.values()] for t in TASKS},
               "answer bits per byte (lower is better)", "Held-out answer bits per byte")
    _plot_bars(axes[0][1], summaries, colours,
               {c: [[100 * x for x in s["columns"][c]] for s in summaries.values()]
                for c in COLUMNS}, "exact match %", "Held-out exact match")
    _plot_layers(axes[1][0], summaries, colours, "loops")
    _plot_layers(axes[1][1], summaries, colours, "gates")
    fig.suptitle("Paper miniature: bars are means over seeds, whiskers the seed range")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_bars(ax: Any, summaries: dict[str, dict[str, Any]], colours: dict[str, Any],
               groups: dict[str, list[list[float]]], ylabel: str, title: str) -> None:
    """groups: {x label: [per-seed values of each variant, in summaries order]}."""
    width = 0.8 / len(summaries)
    for i, name in enumerate(summaries):
        xs = [j + (i - (len(summaries) - 1) / 2) * width for j in range(len(groups))]
        values = [per_variant[i] for per_variant in groups.values()]
        means = [statistics.fmean(v) for v in values]
        below = [m - min(v) for m, v in zip(means, values, strict=True)]
        above = [max(v) - m for m, v in zip(means, values, strict=True)]
        ax.bar(xs, means, width, yerr=[below, above], capsize=2, color=colours[name],
               label=summaries[name]["label"])
    ax.set(xticks=range(len(groups)), xticklabels=list(groups), ylabel=ylabel, title=title)
    ax.legend(fontsize=7)


def _plot_layers(ax: Any, summaries: dict[str, dict[str, Any]], colours: dict[str, Any],
                 key: str) -> None:
    """Loops (variants that loop) or gates (variants with memory; local solid, global
    dashed) against the layer."""
    for name, s in summaries.items():
        layers = list(range(1, len(s["loops"]) + 1))
        if key == "loops" and max(s["loops"]) > 1:
            ax.plot(layers, s["loops"], marker="o", color=colours[name], label=s["label"])
        elif key == "gates" and s["memory"]:
            ax.plot(layers, [g[0] for g in s["gates"]], marker="o", color=colours[name],
                    label=s["label"])
            ax.plot(layers, [g[1] for g in s["gates"]], marker="x", ls="--",
                    color=colours[name])
    if key == "loops":
        ax.set(ylabel="mean loop steps (served)", title="Loops per layer (looping variants)")
    else:
        ax.set(ylabel="mean gate: local (solid), global (dashed)",
               title="Memory gates per layer (variants with memory)")
    ax.set(xlabel="layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paper_miniature_report",
                                description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--page", type=Path, default=PAGE)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    runs = load(args.results)
    if not runs:
        p.error(f"no results in {args.results}: run python -m benchmarks.paper_miniature")
    summaries = {name: summary(records) for name, records in runs.items()}
    try:
        setup = [common(runs, key) for key in ("steps", "batch_size", "test_per_cell")]
    except ValueError as exc:
        p.error(str(exc))
    lines = page_lines(summaries, *setup)
    args.page.write_text("\n".join([*lines, *kept_notes(args.page)]) + "\n")
    if not args.no_plot:
        plot(summaries, args.page.with_suffix(".png"))
    print(json.dumps({name: {"em": {c: round(statistics.fmean(v), 4)
                                    for c, v in s["columns"].items()},
                             "bpb": round(statistics.fmean(s["bpb"]), 4), "loops": s["loops"]}
                      for name, s in summaries.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
