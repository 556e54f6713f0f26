"""Host syncs and kernel launches of one decode step of the engine, counted on any device.

A random model whose router biases make tokens halt at different depths serves a full
decode batch; one `llm.engine.step()` of pure decode then runs under `OpCounter`
(benchmarks/op_counts.py). The JSON gives the step's totals, the averages per (layer, loop
step) call, the top ops, where the syncs come from, and what a GPU would pay on the host
for them (a launch and a sync cost, both flags).

    python -m benchmarks.host_overhead                    # paper-loop3-mem, batch 64, bf16
    python -m benchmarks.host_overhead --preset tiny --dtype fp32

A test imports `count_decode_step(llm)` to hold the sync count.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import time

import torch

from benchmarks.machine import machine_name
from benchmarks.op_counts import OpCounter
from engine import LLM, ByteTokenizer, LoopLM, SamplingParams, get_preset
from engine.row_norm import fused_norms
from model.weights import resolve_dtype


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper-loop3-mem")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--batch", type=int, default=64, help="decoding sequences")
    parser.add_argument("--prompt-len", type=int, default=1,
                        help="short: bf16 on a CPU is slow")
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--router-bias", type=float, default=1.0,
                        help="router bias; sets the mix of depths of a random model")
    parser.add_argument("--router-std", type=float, default=0.05)
    parser.add_argument("--launch-us", type=float, default=5.0, help="host cost of a launch")
    parser.add_argument("--sync-us", type=float, default=15.0, help="host cost of a sync")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loop-form", default="auto", choices=("auto", "masked", "compacted"),
                        help="the runner's form choice (masked: what a GPU decode step runs)")
    parser.add_argument("--static-decode", default="off", choices=("auto", "on", "off"),
                        help="on: the fixed-shape decode bucket (a CUDA graph on a GPU)")
    parser.add_argument("--compile-chains", action="store_true",
                        help="masked steps through the torch.compile'd chains (fused_chains)")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def build_llm(preset: str, device: str = "cpu", dtype: str = "bf16", batch: int = 64,
              context: int = 64, router_bias: float = 1.0, router_std: float = 0.05,
              seed: int = 0, **engine_options) -> LLM:
    """An engine over a random `preset` model whose tokens halt at varied depths, with KV
    room for `batch` sequences of `context` tokens."""
    torch.manual_seed(seed)
    model = LoopLM(get_preset(preset))
    with torch.no_grad():
        for block in model.layers:
            block.loop_scale.fill_(0.0)  # every loop step contributes, as in a trained model
            block.router.weight.normal_(0.0, router_std)
            block.router.bias.fill_(router_bias)
    model = model.to(device=device, dtype=resolve_dtype(dtype)).eval()
    block_size = 16
    blocks = batch * -(-context // block_size) + 4
    return LLM(model, tokenizer=token_ids_tokenizer(model), num_kv_blocks=blocks,
               block_size=block_size, max_num_seqs=batch,
               max_num_batched_tokens=max(256, batch * context), enable_prefix_caching=False,
               **engine_options)


def token_ids_tokenizer(model: LoopLM) -> ByteTokenizer:
    """A byte tokenizer over the model's vocabulary: requests here are token ids, so a
    preset that names a Hugging Face tokenizer needs no tokenizer files."""
    cfg = model.config
    return ByteTokenizer(cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)


def start_decode_batch(llm: LLM, batch: int, prompt_len: int, max_tokens: int,
                       threshold: float | None = None, seed: int = 0) -> None:
    """Queue `batch` greedy requests and step until every prompt is computed: from then on
    each step decodes one token of every sequence."""
    vocab = llm.engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, min(vocab, 256), (batch, prompt_len), generator=gen).tolist()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            halt_threshold=threshold)
    for prompt in prompts:
        llm.engine.add_request(llm.engine.prepare(prompt, params))
    while llm.engine.num_waiting or _prompt_tokens_left(llm):
        llm.engine.step()


def _prompt_tokens_left(llm: LLM) -> bool:
    return any(r.num_computed_tokens < r.prompt_len for r in llm.engine.scheduler.running)


def count_decode_step(llm: LLM, launch_us: float = 5.0, sync_us: float = 15.0) -> dict:
    """Run one `llm.engine.step()` under `OpCounter` and return its counts: totals, per
    (layer, loop step) call averages, top ops, sync sites and the host time a GPU would pay.
    The engine must be decoding (see `start_decode_batch`)."""
    engine = llm.engine
    stats = []
    callback, engine.stats_callback = engine.stats_callback, stats.append
    simulate = engine.model.device.type == "cpu"
    # a simulated GPU step counts the GPU's norms (an fp32 CPU engine composes its own)
    norms = fused_norms(engine.runner.blocks) if simulate else contextlib.nullcontext()
    try:
        with norms, OpCounter(simulate=simulate) as counter:
            counter.mark_host(*host_tensors(engine))
            engine.step()
    finally:
        engine.stats_callback = callback
    step = stats[-1] if stats else None
    cfg = engine.model_config
    calls = len(step.active_per_call) if step else cfg.n_layers * cfg.max_loops
    host_us = (counter.kernels + counter.uploads) * launch_us + counter.syncs * sync_us
    decoded = step.num_generation_tokens if step else 0
    result = counter.summary()
    result.update({
        "decode_tokens": decoded, "prompt_tokens": step.num_prompt_tokens if step else None,
        "layer_step_calls": calls,
        "mean_loops_per_token": _mean_loops(step, cfg.n_layers),
        "per_layer_step": {"syncs": counter.syncs / calls, "kernels": counter.kernels / calls},
        "gpu_host_estimate": {
            "launch_us": launch_us, "sync_us": sync_us, "host_ms_per_step": host_us / 1e3,
            "tokens_per_s_bound": decoded / (host_us / 1e6) if host_us else None},
    })
    return result


def host_tensors(engine) -> list[torch.Tensor]:
    """Tensors the engine keeps on the host by design (made before counting started)."""
    table = getattr(engine, "flop_table", None)
    return [v for v in vars(table).values() if isinstance(v, torch.Tensor)] if table else []


def _mean_loops(step, n_layers: int) -> float | None:
    if not step or not step.layer_tokens:
        return None
    return sum(active for _, _, active in step.active_per_call) / (step.layer_tokens * n_layers)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = [time.perf_counter()]
    llm = build_llm(args.preset, args.device, args.dtype, args.batch, args.prompt_len + 8,
                    args.router_bias, args.router_std, args.seed, loop_form=args.loop_form,
                    static_decode=args.static_decode, compile_chains=args.compile_chains)
    clock.append(time.perf_counter())
    start_decode_batch(llm, args.batch, args.prompt_len, max_tokens=4,
                       threshold=args.threshold, seed=args.seed)
    clock.append(time.perf_counter())
    counts = count_decode_step(llm, args.launch_us, args.sync_us)
    clock.append(time.perf_counter())
    build, prefill, counted = (b - a for a, b in itertools.pairwise(clock))
    result = {
        "benchmark": "host_overhead", "machine": machine_name(args.device),
        "threads": torch.get_num_threads(), "device": args.device,
        "dtype": str(llm.engine.model.dtype), "model": args.preset,
        "model_config": llm.engine.model_config.to_dict(), "batch": args.batch,
        "prompt_len": args.prompt_len, "counted_step": "the first decode step after the prompts",
        "halt_threshold": args.threshold, "router_bias": args.router_bias,
        "router_std": args.router_std, "simulated_device": args.device == "cpu",
        "loop_form": args.loop_form, "static_decode": args.static_decode,
        "compile_chains": args.compile_chains,
        "seconds": {"build": build, "prompts": prefill, "counted_step": counted},
        "step": counts,
    }
    print(json.dumps(result))
    return result



if __name__ == "__main__":
    main()
