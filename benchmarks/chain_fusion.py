"""The masked decode step with its elementwise chains fused by `torch.compile`, against the
same step eager (`engine/fused_chains.py`), on one model in one run.

Two engines over one model (`--compile-chains` off and on, both `--loop-form masked`)
prefill the same requests; then rounds of decode steps alternate between them (interleaved,
so the machine's noise falls on both), and each engine's first decode step is counted
(`OpCounter`: kernels and syncs per (layer, loop step)). Reports step times, the compiled
over eager step-time ratio, kernel counts, and the start-up the compilation costs.

    python -m benchmarks.chain_fusion                                  # tiny, fp32, CPU
    python -m benchmarks.chain_fusion --preset paper-loop3-mem --dtype bf16 --batch 64 \\
        --context 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from benchmarks.decode_bench import add_model_flags, build_model, prefilled
from benchmarks.host_overhead import count_decode_step
from benchmarks.machine import machine_name, sync


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_flags(parser)
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.set_defaults(context=32, static_decode="off", threads=1)
    return parser.parse_args(argv)


def timed_round(llm, steps: int, device: str) -> float:
    """Seconds per decode step over `steps` steps."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        llm.engine.step()
    sync(device)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.steps = args.rounds * args.steps_per_round + 2  # decode room for every round
    model = build_model(args)
    engines, startup = {}, {}
    for name, compiled in (("eager", False), ("compiled", True)):
        start = time.perf_counter()
        engines[name] = prefilled(model, args, "adaptive", loop_form="masked",
                                  compile_chains=compiled)
        startup[name] = time.perf_counter() - start
        print(f"{name}: ready in {startup[name]:.1f} s", file=sys.stderr, flush=True)
    counts = {name: count_decode_step(llm) for name, llm in engines.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(args.rounds):
        for name, llm in engines.items():
            times[name].append(timed_round(llm, args.steps_per_round, args.device))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {t[-1] * 1e3:.2f} ms" for n, t in times.items()), file=sys.stderr, flush=True)
    rows = {name: {"step_seconds_median": statistics.median(t), "step_seconds": t,
                   "startup_seconds": startup[name],
                   "kernels_per_layer_step": counts[name]["per_layer_step"]["kernels"],
                   "syncs_per_step": counts[name]["syncs"],
                   "kernels_per_step": counts[name]["kernels"],
                   "top_kernel_ops": counts[name]["top_kernel_ops"]}
            for name, t in times.items()}
    ratios = [c / e for c, e in zip(times["compiled"], times["eager"], strict=True)]
    out = {"benchmark": "chain_fusion", "machine": machine_name(args.device),
           "device": args.device, "dtype": str(model.dtype), "preset": args.preset,
           "threads": torch.get_num_threads(), "batch": args.batch, "context": args.context,
           "rounds": args.rounds, "steps_per_round": args.steps_per_round,
           "halt_threshold": args.threshold, "router_bias": args.router_bias, **rows,
           "compiled_over_eager_step_time": statistics.median(ratios),
           "compiled_over_eager_per_round": ratios}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
