"""Per-request measurements and the run's summary, with vLLM `bench serve` field names.

Latencies, per request (seconds here, milliseconds in the summary):
- TTFT: request sent -> first chunk carrying text;
- ITL: gaps between successive chunks carrying text;
- TPOT: (E2E - TTFT) / (output tokens - 1);
- E2E: request sent -> stream closed.
Output tokens are the server's `usage.completion_tokens` (the text chunks when it sends no
usage). Loop statistics come from `usage.compute` (loopserve only; absent elsewhere).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from clients.types import Compute

LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclasses.dataclass
class RequestResult:
    """What one request measured; times are seconds, `start` from the run's start."""

    start: float = 0.0
    success: bool = False
    error: str | None = None  # a short error type, e.g. "429 rate_limit_error"
    message: str = ""  # the server's message
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, when the server reports them
    output_tokens: int = 0
    ttft: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    e2el: float = 0.0
    chunk_times: list[float] = dataclasses.field(default_factory=list)  # from run start
    text: str = ""
    correct: bool | None = None  # the dataset's answer matched
    compute: Compute | None = None

    @property
    def end(self) -> float:
        return self.start + self.e2el

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def latency_fields(name: str, values_s: Sequence[float], percentiles: Sequence[float]
                   ) -> dict[str, float]:
    """mean/median/std/pXX of one latency, in ms (zeros when there are no values)."""
    ms = np.asarray(values_s, dtype=float) * 1000.0 if len(values_s) else np.zeros(1)
    fields = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
              f"std_{name}_ms": float(ms.std())}
    for p in percentiles:
        fields[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return fields


def latencies(results: Sequence[RequestResult]) -> dict[str, list[float]]:
    """Each latency's values over the successful requests, in seconds."""
    ok = [r for r in results if r.success]
    return {"ttft": [r.ttft for r in ok if r.ttft is not None],
            "tpot": [t for r in ok if (t := r.tpot) is not None],
            "itl": [gap for r in ok for gap in r.itl],
            "e2el": [r.e2el for r in ok]}


def meets_slos(result: RequestResult, slos_ms: dict[str, float]) -> bool:
    values = {"ttft": result.ttft, "tpot": result.tpot, "e2el": result.e2el}
    return result.success and all(
        values.get(name) is None or values[name] * 1000.0 <= limit
        for name, limit in slos_ms.items())


def timeline(results: Sequence[RequestResult], bin_s: float | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin edges [n+1], output tokens/s [n] and completed requests/s [n] over the run.

    `bin_s` None: 1 s bins, or 20 bins for a run shorter than 20 s.
    """
    times, weights = token_times(results)
    ends = [r.end for r in results if r.success]
    span = max([*times, *ends, 1e-3])
    bin_s = bin_s or (1.0 if span >= 20 else span / 20)
    edges = np.arange(math.ceil(span / bin_s) + 1) * bin_s
    tokens, _ = np.histogram(times, bins=edges, weights=weights or None)
    done, _ = np.histogram(ends, bins=edges)
    return edges, tokens / bin_s, done / bin_s


def peak_output_rate(results: Sequence[RequestResult]) -> float:
    """The highest output tokens/s over 1 s windows (vLLM's max_output_tokens_per_s); a
    run shorter than a second is one window."""
    times, _ = token_times(results)
    span = max(times, default=0.0)
    _, tokens, _ = timeline(results, 1.0 if span >= 1.0 else max(span, 1e-3) * 1.0001)
    return float(tokens.max(initial=0.0))


def token_times(results: Sequence[RequestResult]) -> tuple[list[float], list[float]]:
    """Chunk arrival times with the output tokens each stands for (a request's tokens spread
    evenly over its text chunks)."""
    times, weights = [], []
    for r in results:
        if r.success and r.chunk_times:
            share = r.output_tokens / len(r.chunk_times)
            times += r.chunk_times
            weights += [share] * len(r.chunk_times)
    return times, weights


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    events = sorted([(r.start, 1) for r in results] + [(r.end, -1) for r in results],
                    key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def weighted_layers(rows: list[tuple[Sequence[float], float]]) -> list[float]:
    total = sum(w for _, w in rows)
    if not rows or total <= 0:
        return []
    return [sum(v[i] * w for v, w in rows) / total for i in range(len(rows[0][0]))]


def loop_fields(results: Sequence[RequestResult], percentiles: Sequence[float]
                ) -> dict[str, Any]:
    """Loop statistics from the responses' usage.compute.

    Per-request figures (mean_loops_per_token, mean_compute_saved) average over requests,
    as the server's histograms do; per-layer figures weigh each request by the tokens it
    ran through the layers (prompt + output - 1, less the prompt tokens the server says it
    took from its prefix cache), as the server's layer counters do.
    """
    rows = [(r, r.compute) for r in results if r.success and r.compute is not None]
    if not rows:
        return {"requests_with_compute": 0}
    loops = [c.mean_loops_per_token for _, c in rows]
    weights = [max(r.prompt_tokens - r.cached_tokens + r.output_tokens - 1, 1) for r, _ in rows]
    flops = sum(c.flops for _, c in rows)
    flops_max = sum(c.flops_max_depth for _, c in rows)
    fields: dict[str, Any] = {
        "requests_with_compute": len(rows), "max_loops": max(c.max_loops for _, c in rows),
        "mean_loops_per_token": statistics.fmean(loops),
        "median_loops_per_token": float(np.median(loops))}
    fields.update({f"p{p:g}_loops_per_token": float(np.percentile(loops, p))
                   for p in percentiles})
    fields.update({
        "loops_per_layer": weighted_layers(
            [(c.loops_per_layer, w) for (_, c), w in zip(rows, weights, strict=True)]),
        "memory_gate_per_layer": weighted_layers(
            [(c.memory_gate_per_layer, w) for (_, c), w in zip(rows, weights, strict=True)]),
        "total_flops": flops, "total_flops_max_depth": flops_max,
        "compute_saved": 1.0 - flops / flops_max if flops_max else 0.0,
        "mean_compute_saved": statistics.fmean(c.compute_saved for _, c in rows)})
    return fields


def summarize(results: Sequence[RequestResult], duration: float,
              slos_ms: dict[str, float] | None = None,
              percentiles: Sequence[float] = (90, 99)) -> dict[str, Any]:
    """The run's figures, named as vLLM's `bench serve` names them where they mean the same."""
    ok = [r for r in results if r.success]
    duration = max(duration, 1e-9)
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    summary: dict[str, Any] = {
        "duration": duration, "num_requests": len(results), "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors_by_type": dict(Counter(r.error for r in results if not r.success)),
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "request_goodput": (sum(meets_slos(r, slos_ms) for r in results) / duration
                            if slos_ms else None),
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "max_output_tokens_per_s": peak_output_rate(results),
        "max_concurrent_requests": peak_concurrency(results)}
    graded = [r.correct for r in ok if r.correct is not None]
    if graded:
        summary["exact_match"] = sum(graded) / len(graded)
    for name, values in latencies(results).items():
        summary.update(latency_fields(name, values, percentiles))
    summary.update(loop_fields(results, percentiles))
    return summary


def detailed_fields(results: Sequence[RequestResult]) -> dict[str, list]:
    """Per-request arrays, as vLLM saves with --save-detailed."""
    return {"input_lens": [r.prompt_tokens for r in results],
            "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
            "e2els": [r.e2el for r in results], "start_times": [r.start for r in results],
            "generated_texts": [r.text for r in results],
            "errors": [r.message if not r.success else "" for r in results]}
