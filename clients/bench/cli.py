"""`loopserve bench`: arguments, the run (or sweep), the printout, the JSON and the PNG.

    loopserve bench --url http://localhost:8000 --request-rate 2,4,8 --num-prompts 200 \\
        --random-input-len 64 --random-output-len 32 --ignore-eos \\
        --goodput ttft:500 tpot:100 --result-file bench.json --plot bench.png
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any

from clients.async_client import AsyncClient
from clients.bench.datasets import (
    DATASETS,
    BenchRequest,
    heldout_requests,
    jsonl_requests,
    random_requests,
    sample,
)
from clients.bench.metrics import detailed_fields, summarize
from clients.bench.progress import Progress
from clients.bench.report import write_report
from clients.bench.runner import Load, Run, Target, warm_up
from clients.bench.table import format_summary
from clients.cli import connection_args
from clients.errors import LoopserveError

DEFAULT_NUM_PROMPTS = 100
POOL_FOR_DURATION = 1000  # distinct prompts cycled through by a duration-limited run
WARMUP_SEED = 1_000_003  # offset of the warm-up's seed from the runs'


def numbers(text: str) -> list[float]:
    """'1,2.5,inf' -> [1.0, 2.5, inf]."""
    return [float(x) for x in text.split(",") if x.strip()]


def slos(items: list[str]) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    result = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        result[name] = float(value)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loopserve bench", description=(
        "Load-test any OpenAI-compatible server; loopserve's responses add loop statistics."))
    connection_args(p)
    p.set_defaults(max_retries=0)  # a retried request would hide the error it met
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    workload_args(p)
    load_args(p)
    request_args(p)
    output_args(p)
    return p


def workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASETS, default="random")
    p.add_argument("--dataset-path", default=None, help="JSONL file (jsonl; heldout override)")
    p.add_argument("--random-input-len", type=int, default=64, help="prompt tokens (random)")
    p.add_argument("--random-output-len", type=int, default=32, help="max_tokens (random)")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly within +- this fraction")
    p.add_argument("--chars-per-token", type=float, default=1.0,
                   help="random text length per token (1 for byte tokenizers, ~4 for BPE)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="max_tokens of JSONL lines that set none")
    p.add_argument("--seed", type=int, default=0)


def load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--request-rate", type=numbers, default=[math.inf],
                   help="requests/s, Poisson or gamma arrivals; a comma list sweeps")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape: 1 Poisson, < 1 burstier, > 1 more regular")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="cap on requests in flight at a request rate")
    p.add_argument("--concurrency", type=numbers, default=None,
                   help="closed loop: this many requests always in flight; a comma list sweeps")
    p.add_argument("--num-prompts", type=int, default=None,
                   help=f"requests per run (default {DEFAULT_NUM_PROMPTS} without --duration)")
    p.add_argument("--duration", type=float, default=None, help="seconds of sending per run")
    p.add_argument("--warmup", type=int, default=0, help="requests sent first and not counted")


def request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly max_tokens")
    p.add_argument("--halt-threshold", type=float, default=None, help="loopserve's knob")
    p.add_argument("--max-loops", type=int, default=None, help="loopserve's knob")
    p.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into bodies")


def output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--goodput", nargs="+", default=[], metavar="SLO",
                   help="SLOs in ms for goodput, e.g. ttft:500 tpot:50 e2el:2000")
    p.add_argument("--metric-percentiles", type=numbers, default=[90.0, 99.0])
    p.add_argument("--result-file", default=None, help="write the results as JSON here")
    p.add_argument("--save-detailed", action="store_true", help="per-request arrays in JSON")
    p.add_argument("--plot", default=None, help="write the PNG report here")
    p.add_argument("--json", action="store_true", help="print the results JSON as last line")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="live progress bar (default: when stderr is a terminal)")


def make_loads(args: argparse.Namespace) -> list[Load]:
    num_prompts = args.num_prompts or (None if args.duration else DEFAULT_NUM_PROMPTS)
    common = {"num_prompts": num_prompts, "duration": args.duration, "seed": args.seed}
    if args.concurrency:
        return [Load(concurrency=int(c), **common) for c in args.concurrency]
    return [Load(request_rate=rate, burstiness=args.burstiness,
                 max_concurrency=args.max_concurrency, **common) for rate in args.request_rate]


def make_target(args: argparse.Namespace) -> Target:
    params: dict[str, Any] = {"temperature": args.temperature, "top_k": args.top_k,
                              "halt_threshold": args.halt_threshold, "max_loops": args.max_loops,
                              "extra_body": args.extra_body}
    if args.ignore_eos:
        params["ignore_eos"] = True
    return Target(args.endpoint, {k: v for k, v in params.items() if v is not None},
                  args.chars_per_token)


def make_dataset(args: argparse.Namespace, count: int, seed: int) -> list[BenchRequest]:
    """`count` requests; each run of a sweep (and the warm-up) draws with its own seed, so
    random prompts differ between runs and a later run gains nothing from the prefix cache
    the earlier ones filled."""
    if args.dataset == "random":
        return random_requests(count, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.chars_per_token, seed)
    if args.dataset == "heldout":
        pool = heldout_requests(args.dataset_path, args.max_tokens)
    elif args.dataset_path:
        pool = jsonl_requests(args.dataset_path, args.max_tokens)
    else:
        raise ValueError("--dataset jsonl needs --dataset-path FILE")
    if args.endpoint == "completions" and any(r.prompt is None for r in pool):
        raise ValueError("the dataset has chat messages without a prompt: use --endpoint chat")
    return sample(pool, count, seed)


def run_header(args: argparse.Namespace, model: str | None, load: Load) -> dict[str, Any]:
    """The run's settings, with vLLM's names where they exist."""
    rate = load.request_rate
    return {"date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
            "backend": "openai-chat" if args.endpoint == "chat" else "openai",
            "endpoint": "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions",
            "base_url": args.url, "model_id": model, "dataset": args.dataset,
            "num_prompts": load.num_prompts, "duration_limit": load.duration,
            "request_rate": "inf" if math.isinf(rate) or load.concurrency else rate,
            "burstiness": load.burstiness, "max_concurrency": load.max_concurrency,
            "concurrency": load.concurrency, "warmup": args.warmup, "seed": args.seed}


async def resolve_model(client: AsyncClient, model: str | None) -> str | None:
    """The model to name in requests: --model, else the server's first (None: omitted)."""
    if model:
        return model
    try:
        models = await client.models()
    except LoopserveError:
        return None
    return models[0].id if models else None


async def run_one(client: AsyncClient, target: Target, load: Load, pool: list[BenchRequest],
                  show: bool | None) -> tuple[list, float]:
    progress = Progress(load.label, load.num_prompts, load.duration, enabled=show)
    drawer = asyncio.create_task(progress.run())
    try:
        return await Run(client, target, load, progress).run(pool)
    finally:
        drawer.cancel()
        progress.close()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Every run of the sweep; returns the JSON results (one run's dict or {"runs": [...]})."""
    target, loads = make_target(args), make_loads(args)
    goals, runs = slos(args.goodput), []
    async with AsyncClient(args.url, api_key=args.api_key, timeout=args.timeout,
                           max_retries=args.max_retries) as client:
        client.model = await resolve_model(client, args.model)
        if args.warmup:
            warm_set = make_dataset(args, args.warmup, args.seed + WARMUP_SEED)
            warm = await warm_up(client, target, warm_set, args.warmup)
            print(f"warm-up: {sum(r.success for r in warm)}/{len(warm)} succeeded",
                  file=sys.stderr)
        for index, load in enumerate(loads):
            pool = make_dataset(args, load.num_prompts or POOL_FOR_DURATION, args.seed + index)
            results, duration = await run_one(client, target, load, pool, args.progress)
            summary = summarize(results, duration, goals, args.metric_percentiles)
            print(format_summary(load.label, summary), flush=True)
            record = {**run_header(args, client.model, load), **summary}
            if args.save_detailed:
                record.update(detailed_fields(results))
            runs.append((load.label, results, record))
    if args.plot:
        write_report(args.plot, runs, f"loopserve bench: {args.url} ({client.model})")
    return runs[0][2] if len(runs) == 1 else {"runs": [record for _, _, record in runs]}


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv[1:])
    try:
        output = asyncio.run(bench(args))
    except (ValueError, OSError) as error:
        print(f"loopserve bench: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    text = json.dumps(output, default=str)
    if args.result_file:
        Path(args.result_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.result_file).write_text(text + "\n")
    if args.json:
        print(text)
    return 0
