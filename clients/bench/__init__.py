"""`loopserve bench`: a load generator for any OpenAI-compatible server.

    arrivals  when requests start (Poisson / gamma with burstiness)
    datasets  what they ask (random text, the bundled model's held-out problems, JSONL)
    runner    offering the load (open loop at a rate, or closed loop at a concurrency)
    metrics   per-request timings and the summary (vLLM `bench serve` field names)
    table, progress, report   the printout, the live bar, the PNG
    cli       arguments and the sweep
"""

from clients.bench.cli import main

__all__ = ["main"]
