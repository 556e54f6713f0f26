"""Summarise a gpu_suite.sh run: one table of its figures against the issue's goals, and
the same as JSON on the last line.

    python -m benchmarks.gpu_summary benchmarks/results/<date>-gpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOALS = {"throughput_over_flop_ratio": 0.8, "bytes_fraction_of_copy_peak": 0.5,
         "peer_ratio": 3.0}


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def decode_rows(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("decode-*.json")):
        run = _load(path)
        if run is None:
            rows.append({"run": path.stem, "error": "no JSON (see its .log)"})
            continue
        if "skipped" in run:
            rows.append({"run": path.stem, "skipped": run["skipped"]})
            continue
        rows.append({
            "run": path.stem, "batch": run["batch"], "context": run["context"],
            "adaptive_tok_s": round(run["adaptive"]["tokens_per_s"]),
            "max_depth_tok_s": round(run["max_depth"]["tokens_per_s"]),
            "throughput_ratio": round(run["adaptive_over_max_depth_throughput"], 3),
            "flop_ratio": round(run["flop_ratio"], 3),
            "throughput_over_flop_ratio": round(run["throughput_over_flop_ratio"], 3),
            "bytes_fraction_of_copy_peak": round(
                run["adaptive"]["bytes_fraction_of_copy_peak"], 3),
            "step_ms": round(run["adaptive"]["step_seconds"] * 1e3, 2)})
    return rows


def paged_rows(folder: Path) -> list[dict]:
    """The paged-attention step: the engine's call against FlexAttention in place."""
    run = _load(folder / "paged-attention.json")
    if run is None:
        return []
    if "skipped" in run:
        return [run]
    return [{"batch": r["batch"], "context": r["context"],
             "attend_ms": round(r["seconds"]["attend_now"] * 1e3, 3),
             "flex_over_now": r.get("flex_over_now"), "flex_error": r.get("flex_error"),
             "gather_fraction_of_copy_rate": round(r["gather_fraction_of_copy_rate"], 3)}
            for r in run["results"]]


def main(argv: list[str] | None = None) -> dict:
    folder = Path((argv or sys.argv[1:])[0])
    summary = {"decode": decode_rows(folder), "peer": _load(folder / "peer.json"),
               "paged_attention": paged_rows(folder),
               "tests": (folder / "tests.log").read_text().strip().splitlines()[-1:]
               if (folder / "tests.log").exists() else None, "goals": GOALS}
    for row in summary["decode"]:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
