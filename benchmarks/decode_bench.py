"""Decode-step time at a fixed batch and context, adaptive against max-depth, in one run.

Prefills `batch` requests of `context` tokens, then times `steps` decode steps of each
engine (after warm-up), and reports per engine: step time, tokens/s, the forms its
(layer, loop step) calls took, and the achieved rates against the measured peaks: FLOP/s
(counted analytically, as usage.compute) and bytes/s (the weights each executed
(layer, step) reads once, plus the k/v each active query reads). On CUDA the decode steps
replay CUDA graphs; `--sync-debug` runs them under `torch.cuda.set_sync_debug_mode("error")`
so that any host sync inside the captured region fails the run.

    python -m benchmarks.decode_bench --preset tiny --batch 8 --context 64      # CPU smoke
    python -m benchmarks.decode_bench --preset paper-loop3-mem --device cuda --dtype bf16 \
        --batch 64 --context 1024 --router-bias 0.4 --sync-debug
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

from benchmarks.engine_throughput import copy_rate, matmul_rate
from benchmarks.host_overhead import token_ids_tokenizer
from benchmarks.machine import machine_name, sync
from engine import LLM, LoopLM, SamplingParams, get_preset
from engine.engine_config import ATTENTION_BACKENDS
from engine.runner import ModelRunner
from model.weights import resolve_dtype


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The random model and decode batch flags (chain_fusion shares them)."""
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=64, help="prompt tokens per request")
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--router-bias", type=float, default=0.4,
                        help="router bias of the random model (0.4: mean depth near 2)")
    parser.add_argument("--router-std", type=float, default=0.05)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--static-decode", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_flags(parser)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed")
    parser.add_argument("--sync-debug", action="store_true")
    parser.add_argument("--compile-chains", action="store_true",
                        help="masked steps through the torch.compile'd chains (fused_chains)")
    parser.add_argument("--attention-backend", default="gather", choices=ATTENTION_BACKENDS,
                        help="decode attention: block gather + SDPA, FlexAttention in "
                             "place, or the Triton paged kernel in place (halted rows read "
                             "one key)")
    return parser.parse_args(argv)


WARM_UP_STEPS = 3


def batched_tokens(args: argparse.Namespace) -> int:
    return max(2048, args.context)


def output_budget(args: argparse.Namespace) -> int:
    """max_tokens of every request: enough for none to finish before the timed steps end.
    The scheduler keeps decoding the requests whose prompts are done while the others
    prefill, so the first ones decode one token a step through the whole prefill
    (batch * context / batched tokens steps), then the warm-up, then the timed steps."""
    prefill_steps = -(-args.batch * args.context // batched_tokens(args)) + 1
    return prefill_steps + WARM_UP_STEPS + args.steps + 8


def build_model(args: argparse.Namespace) -> LoopLM:
    torch.manual_seed(args.seed)
    config = get_preset(args.preset)
    longest = args.context + output_budget(args) + 16
    config = type(config)(**{**config.to_dict(),
                             "max_position": max(config.max_position, longest)})
    with torch.device(args.device):
        model = LoopLM(config)
    with torch.no_grad():
        for block in model.layers:
            block.loop_scale.fill_(0.0)
            block.router.weight.normal_(0.0, args.router_std)
            block.router.bias.fill_(args.router_bias)
    return model.to(dtype=resolve_dtype(args.dtype)).eval()


def prefilled(model: LoopLM, args: argparse.Namespace, mode: str, **options) -> LLM:
    blocks_per_seq = -(-(args.context + output_budget(args)) // args.block_size)
    llm = LLM(model, tokenizer=token_ids_tokenizer(model),
              num_kv_blocks=args.batch * blocks_per_seq + 8, block_size=args.block_size,
              max_num_seqs=args.batch, max_num_batched_tokens=batched_tokens(args),
              enable_prefix_caching=False, mode=mode, static_decode=args.static_decode,
              **options)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    params = SamplingParams(max_tokens=output_budget(args), temperature=0.0, ignore_eos=True,
                            halt_threshold=args.threshold)
    engine = llm.engine
    for _ in range(args.batch):
        prompt = torch.randint(0, min(vocab, 256), (args.context,), generator=gen).tolist()
        engine.add_request(engine.prepare(prompt, params))
    while any(r.num_output_tokens == 0 for r in engine.scheduler.running) or \
            engine.scheduler.waiting:
        engine.step()
    return llm


def time_decode(llm: LLM, args: argparse.Namespace) -> dict:
    engine, calls = llm.engine, []
    engine.stats_callback = lambda stats: calls.append(stats.active_per_call)
    for _ in range(WARM_UP_STEPS):  # warm-up (graphs capture lazily per bucket)
        engine.step()
    calls.clear()
    rows = []
    debug = (torch.cuda.set_sync_debug_mode if args.device.startswith("cuda") else None)
    static = engine.runner.static
    guard = _sync_guard(static, debug) if args.sync_debug and debug else contextlib.nullcontext()
    sync(args.device)
    start = time.perf_counter()
    with guard:
        for _ in range(args.steps):
            rows.append(engine.num_running)  # host bookkeeping: no device work
            engine.step()
    sync(args.device)
    seconds = (time.perf_counter() - start) / args.steps
    if min(rows) != args.batch:  # a request finished or waited: the batch was not full
        raise RuntimeError(f"decoded {min(rows)}-{max(rows)} rows a step, not {args.batch}")
    return {"step_seconds": seconds, "tokens_per_s": sum(rows) / args.steps / seconds,
            "decoded_rows_per_step": [min(rows), max(rows)], "active_per_call": calls,
            "static_replays": static.replays if static is not None else 0}


@contextlib.contextmanager
def _sync_guard(static, set_mode):
    """Sync debug mode 'error' around each bucket replay (the captured region)."""
    run = static.run

    def guarded(*a, **k):
        set_mode("error")
        try:
            return run(*a, **k)
        finally:
            set_mode("default")

    static.run = guarded
    try:
        yield
    finally:
        static.run = run


def rates_of(model: LoopLM, result: dict, context: int) -> dict:
    """Analytic FLOP/s and bytes/s of the timed steps (per step: the mean over steps)."""
    cfg = model.config
    layer_bytes = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    element = torch.empty((), dtype=model.dtype).element_size()
    kv_per_key = 2 * cfg.n_kv_heads * cfg.head_dim * element
    from model.flops import attention_flops, block_matmul_flops
    flops = bytes_moved = 0.0
    for step_calls in result["active_per_call"]:
        for _, t, active in step_calls:
            flops += active * (block_matmul_flops(cfg, t) + attention_flops(cfg, context))
            bytes_moved += layer_bytes + active * context * kv_per_key
    steps = max(len(result["active_per_call"]), 1)
    seconds = result["step_seconds"]
    return {"flops_per_step": flops / steps, "flops_per_s": flops / steps / seconds,
            "bytes_per_s": bytes_moved / steps / seconds,
            "layer_step_calls_per_step": sum(len(c) for c in result["active_per_call"]) / steps}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    peaks = {"matmul": matmul_rate(args.device, model.dtype), "copy": copy_rate(args.device)}
    rows = {}
    for mode in ("adaptive", "max_depth"):
        llm = prefilled(model, args, mode, compile_chains=args.compile_chains,
                        attention_backend=args.attention_backend)
        result = time_decode(llm, args)
        result.update(rates_of(model, result, args.context))
        result["flops_fraction_of_matmul_peak"] = result["flops_per_s"] / peaks["matmul"]
        result["bytes_fraction_of_copy_peak"] = result["bytes_per_s"] / peaks["copy"]
        del result["active_per_call"]
        rows[mode] = result
        print(f"{mode}: {result['step_seconds'] * 1e3:.2f} ms/step, "
              f"{result['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)
        del llm
    out = {"benchmark": "decode_bench", "machine": machine_name(args.device), "device": args.device,
           "dtype": str(model.dtype), "preset": args.preset, "batch": args.batch,
           "context": args.context, "steps": args.steps, "halt_threshold": args.threshold,
           "router_bias": args.router_bias, "compile_chains": args.compile_chains,
           "attention_backend": args.attention_backend,
           "model_config": model.config.to_dict(),
           "kv_bytes_per_token": ModelRunner.kv_bytes_per_token(model),
           "measured_matmul_flops_per_s": peaks["matmul"],
           "measured_copy_bytes_per_s": peaks["copy"], **rows,
           "adaptive_over_max_depth_throughput": rows["adaptive"]["tokens_per_s"]
           / rows["max_depth"]["tokens_per_s"],
           "flop_ratio": rows["max_depth"]["flops_per_step"] / rows["adaptive"]["flops_per_step"]}
    out["throughput_over_flop_ratio"] = (out["adaptive_over_max_depth_throughput"]
                                         / out["flop_ratio"])
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
