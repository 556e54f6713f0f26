"""Tokens/s of the plain reference forward (exact and adaptive) on one model preset.

    python -m benchmarks.reference_forward --preset tiny --batch 8 --seq 128
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from engine import LoopLM, get_preset


def measure(model: LoopLM, ids: torch.Tensor, threshold: float | None, repeats: int) -> float:
    model.reference_forward(ids, halt_threshold=threshold)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model.reference_forward(ids, halt_threshold=threshold)
    return ids.numel() * repeats / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = get_preset(args.preset)
    model = LoopLM(config).eval()
    ids = torch.randint(0, min(config.vocab_size, 256), (args.batch, args.seq))
    result = {
        "benchmark": "reference_forward", "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "preset": args.preset, "batch": args.batch,
        "seq": args.seq, "exact_tokens_per_s": round(measure(model, ids, None, args.repeats), 1),
        "adaptive_tokens_per_s": round(measure(model, ids, args.threshold, args.repeats), 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
