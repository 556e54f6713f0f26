"""The human-readable summary of one run, laid out like vLLM's `bench serve` printout."""

from __future__ import annotations

from typing import Any

from clients.bench.metrics import LATENCIES
from clients.display import bar

NAMES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
         "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
WIDTH = 50


def rule(title: str = "", fill: str = "-") -> str:
    return f"{title:{fill}^{WIDTH}}" if title else fill * WIDTH


def row(name: str, value: Any) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{name + ':':<40}{text:>10}"


def header_rows(s: dict[str, Any]) -> list[str]:
    rows = [row("Successful requests", s["completed"]), row("Failed requests", s["failed"])]
    rows += [f"  {kind}: {count}" for kind, count in sorted(s["errors_by_type"].items())]
    rows += [row("Benchmark duration (s)", s["duration"]),
             row("Total input tokens", s["total_input_tokens"]),
             row("Total generated tokens", s["total_output_tokens"]),
             row("Request throughput (req/s)", s["request_throughput"])]
    if s.get("request_goodput") is not None:
        rows.append(row("Request goodput (req/s)", s["request_goodput"]))
    rows += [row("Output token throughput (tok/s)", s["output_throughput"]),
             row("Peak output token throughput (tok/s)", s["max_output_tokens_per_s"]),
             row("Peak concurrent requests", s["max_concurrent_requests"]),
             row("Total token throughput (tok/s)", s["total_token_throughput"])]
    if "exact_match" in s:
        rows.append(row("Exact match (answers)", s["exact_match"]))
    return rows


def latency_rows(s: dict[str, Any]) -> list[str]:
    rows = []
    for name in LATENCIES:
        rows.append(rule(NAMES[name]))
        for key, value in s.items():
            if key.endswith(f"_{name}_ms") and not key.startswith("std_"):
                stat = key.split("_")[0].capitalize()  # mean, median, p99 -> Mean, Median, P99
                rows.append(row(f"{stat} {name.upper()} (ms)", value))
    return rows


def loop_rows(s: dict[str, Any]) -> list[str]:
    if not s.get("requests_with_compute"):
        return []
    layers = s["loops_per_layer"]
    tails = [key for key in s if key.startswith("p") and key.endswith("_loops_per_token")]
    return [rule("Loops (usage.compute)"),
            row("Mean loops per token", s["mean_loops_per_token"]),
            row("Median loops per token", s["median_loops_per_token"]),
            *(row(f"{key.split('_')[0].upper()} loops per token", s[key]) for key in tails),
            f"{'Loops per layer:':<24}{bar(layers, 1.0, s['max_loops'])} "
            + " ".join(f"{v:.2f}" for v in layers),
            row("Compute saved (FLOPs)", s["compute_saved"]),
            row("Total FLOPs (G)", s["total_flops"] / 1e9)]


def format_summary(title: str, summary: dict[str, Any]) -> str:
    lines = [rule(f" Serving Benchmark Result: {title} ", "=")]
    lines += header_rows(summary) + latency_rows(summary) + loop_rows(summary)
    return "\n".join([*lines, rule(fill="=")])
