"""The same dense model in loopserve and in Hugging Face transformers' `generate`, in one run.

loopserve with max_loops=1 and no memory is a Qwen3 decoder (pre-norm RMSNorm, RoPE with
rotate-half, RMSNorm on each q and k head, SwiGLU, no biases, untied embeddings, final
norm). A random loopserve model is copied tensor by tensor into `Qwen3ForCausalLM` (the
fused qkv and gate_up matrices split; the loop scale s = softplus(alpha), 1 here, folded
into the residual output projections), and the two must give the same logits on the same
ids (fp32) before any speed is reported. Then both generate greedily from the same prompts,
in interleaved runs (loopserve, transformers, loopserve, ...), and the JSON gives tokens/s of
each and their ratio per batch size. Each batch also times its matmul floor (the run's weight
matmuls alone, benchmarks/matmul_floor.py): how much of each engine's time is matmul, and
`ceiling_over_transformers`, the largest ratio over transformers that any engine of these
weights on this device's matmul could reach. EOS handling is off on both sides (loopserve
ignore_eos, transformers without an eos id), so both emit exactly `--output-len` tokens and
their greedy tokens can be compared.

    python -m benchmarks.peer_transformers --threads 1
    python -m benchmarks.peer_transformers --device cuda --dtype bf16   # + static cache
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from benchmarks.machine import machine_name, sync
from benchmarks.matmul_floor import matmul_floor_seconds
from engine import LLM, LoopLM, ModelConfig, SamplingParams
from model.weights import resolve_dtype

LOGIT_TOLERANCE = 1e-4
GOAL_RATIO = {False: 1.5, True: 3.0}  # loopserve / transformers, on CPU and on CUDA
DENSE = ModelConfig(vocab_size=264, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2,
                    head_dim=64, ffn_hidden=1408, max_loops=1, local_memory_slots=0,
                    global_memory_slots=0, max_position=512,
                    loop_scale_init=math.log(math.expm1(1.0)))  # s = softplus(alpha) = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", help="of the timed runs (checked in fp32)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hf-caches", nargs="+", default=None,
                        help="transformers cache implementations (default: dynamic; on CUDA "
                             "also static)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_loopserve(seed: int) -> LoopLM:
    """A random dense model; norm weights perturbed so the weight copy is fully checked."""
    torch.manual_seed(seed)
    model = LoopLM(DENSE)
    with torch.no_grad():
        for module in model.modules():
            if module.__class__.__name__ == "RMSNorm":
                module.weight.add_(0.1 * torch.randn_like(module.weight))
    return model.eval()


def qwen3_config(cfg: ModelConfig):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        tie_word_embeddings=False, attention_bias=False, use_sliding_window=False,
        pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=None)


def to_transformers(model: LoopLM):
    """A `Qwen3ForCausalLM` holding exactly `model`'s weights (every tensor mapped once)."""
    from transformers import Qwen3ForCausalLM

    cfg = model.config
    if cfg.max_loops != 1 or cfg.has_memory:
        raise ValueError("only a dense model (max_loops=1, no memory) is a Qwen3 model")
    hf = Qwen3ForCausalLM(qwen3_config(cfg)).eval()
    target = dict(hf.named_parameters())
    mapped = weight_map(model)
    if set(mapped) != set(target):
        raise ValueError(f"unmapped: {sorted(set(target) ^ set(mapped))}")
    with torch.no_grad():
        for name, tensor in mapped.items():
            if target[name].shape != tensor.shape:
                raise ValueError(f"{name}: {tuple(tensor.shape)} != {tuple(target[name].shape)}")
            target[name].copy_(tensor)
    return hf


def weight_map(model: LoopLM) -> dict[str, torch.Tensor]:
    """transformers parameter name -> loopserve tensor (split or scaled where needed)."""
    cfg = model.config
    q, kv = cfg.q_dim, cfg.kv_dim
    out = {"model.embed_tokens.weight": model.embed.weight,
           "model.norm.weight": model.final_norm.weight, "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.layers):
        scale = block.step_scale(1).detach()  # s_1 multiplies both residual branches
        qkv = block.qkv.weight
        gate_up = block.mlp.gate_up.weight
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "self_attn.q_proj.weight": qkv[:q], p + "self_attn.k_proj.weight": qkv[q:q + kv],
            p + "self_attn.v_proj.weight": qkv[q + kv:],
            p + "self_attn.q_norm.weight": block.q_norm.weight,
            p + "self_attn.k_norm.weight": block.k_norm.weight,
            p + "self_attn.o_proj.weight": scale * block.attn_out.weight,
            p + "post_attention_layernorm.weight": block.mlp_norm.weight,
            p + "mlp.gate_proj.weight": gate_up[:cfg.ffn_hidden],
            p + "mlp.up_proj.weight": gate_up[cfg.ffn_hidden:],
            p + "mlp.down_proj.weight": scale * block.mlp.down.weight,
        })
    return out


@torch.no_grad()
def logit_difference(model: LoopLM, hf, ids: torch.Tensor) -> float:
    """Largest |logit difference| of one whole-sequence forward of both on `ids` [B, T]."""
    ours = model.reference_forward(ids).logits
    theirs = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    return float((ours - theirs).abs().max())


def run_loopserve(llm: LLM, prompts: list[list[int]], output_len: int, device: str
                  ) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    sync(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    sync(device)
    return time.perf_counter() - start, [list(o.token_ids) for o in outputs]


@torch.no_grad()
def run_transformers(hf, prompts: list[list[int]], output_len: int, device: str, cache: str
                     ) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    # transformers would torch.compile the forward for a static cache on CUDA, recompiling
    # for each batch shape: minutes, past the GPU suite's budget; its eager static cache
    # is what this compares with (the JSON says so: transformers_static_compiled)
    options = {} if cache == "dynamic" else {"cache_implementation": cache,
                                             "disable_compile": True}
    sync(device)
    start = time.perf_counter()
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                      max_new_tokens=output_len, min_new_tokens=output_len,
                      pad_token_id=hf.config.pad_token_id, **options)
    sync(device)
    return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()


def bench_batch(llm: LLM, hf, batch: int, args: argparse.Namespace, caches: list[str]) -> dict:
    """Interleaved runs of loopserve, each transformers cache and the matmul floor."""
    gen = torch.Generator().manual_seed(args.seed + batch)
    prompts = torch.randint(0, 256, (batch, args.prompt_len), generator=gen).tolist()
    times: dict[str, list[float]] = {"loopserve": [], **{f"transformers_{c}": [] for c in caches},
                                     "matmul_floor": []}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):  # interleaved: each engine sees the same machine state
        seconds, tokens["loopserve"] = run_loopserve(llm, prompts, args.output_len, args.device)
        times["loopserve"].append(seconds)
        for cache in caches:
            seconds, tokens[cache] = run_transformers(hf, prompts, args.output_len, args.device,
                                                      cache)
            times[f"transformers_{cache}"].append(seconds)
        times["matmul_floor"].append(matmul_floor_seconds(
            llm.engine.runner.model, batch, args.prompt_len, args.output_len, args.device, 1))
    generated = batch * args.output_len
    row = {"batch": batch, "seconds": times}
    for name, runs in times.items():
        row[f"{name}_tokens_per_s"] = generated / min(runs)
    floor = min(times["matmul_floor"])
    row["matmul_share_loopserve"] = floor / min(times["loopserve"])
    for cache in caches:
        row[f"ratio_loopserve_over_transformers_{cache}"] = (
            row["loopserve_tokens_per_s"] / row[f"transformers_{cache}_tokens_per_s"])
        row[f"greedy_tokens_equal_{cache}"] = _agreement(tokens["loopserve"], tokens[cache])
        row[f"matmul_share_transformers_{cache}"] = floor / min(times[f"transformers_{cache}"])
        row[f"ceiling_over_transformers_{cache}"] = min(times[f"transformers_{cache}"]) / floor
    print(f"batch {batch}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                         if k.startswith(("ratio", "ceiling", "matmul_share"))),
          file=sys.stderr, flush=True)
    return row


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of sequences whose greedy tokens are identical."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def warm_up(llm: LLM, hf, args: argparse.Namespace, caches: list[str]) -> None:
    prompts = [[1, 2, 3, 4]] * 2
    run_loopserve(llm, prompts, 4, args.device)
    for cache in caches:
        run_transformers(hf, prompts, 4, args.device, cache)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    caches = args.hf_caches or (["dynamic", "static"] if args.device.startswith("cuda")
                                else ["dynamic"])
    model = build_loopserve(args.seed).to(args.device)
    hf = to_transformers(model).to(args.device)
    check_ids = torch.randint(0, 256, (2, args.prompt_len + args.output_len),
                              generator=torch.Generator().manual_seed(args.seed),
                              ).to(args.device)
    diff = logit_difference(model, hf, check_ids)
    result = {
        "benchmark": "peer_transformers", "machine": machine_name(args.device),
        "threads": torch.get_num_threads(), "device": args.device, "dtype": args.dtype,
        "model_config": model.config.to_dict(), "transformers": _transformers_version(),
        "torch": torch.__version__, "prompt_len": args.prompt_len,
        "output_len": args.output_len, "repeats": args.repeats, "transformers_caches": caches,
        "transformers_static_compiled": False,
        "logit_check": {"dtype": "fp32", "shape": list(check_ids.shape),
                        "max_abs_diff": diff, "tolerance": LOGIT_TOLERANCE,
                        "equal": diff <= LOGIT_TOLERANCE},
    }
    if diff > LOGIT_TOLERANCE:
        result["error"] = "the two models disagree: no speed is reported"
        print(json.dumps(result))
        raise SystemExit(1)
    result["goal_ratio"] = GOAL_RATIO[args.device.startswith("cuda")]
    dtype = resolve_dtype(args.dtype)
    model, hf = model.to(dtype=dtype), hf.to(dtype=dtype)
    longest = args.prompt_len + args.output_len
    llm = LLM(model, num_kv_blocks=max(args.batch_sizes) * -(-longest // 16) + 8, block_size=16,
              max_num_seqs=max(args.batch_sizes),
              max_num_batched_tokens=max(args.batch_sizes) * args.prompt_len,
              enable_prefix_caching=False)
    warm_up(llm, hf, args, caches)
    result["loopserve_engine"] = {"block_size": 16, "enable_prefix_caching": False,
                                  "max_num_batched_tokens": max(args.batch_sizes) *
                                  args.prompt_len}
    result["results"] = [bench_batch(llm, hf, b, args, caches) for b in args.batch_sizes]
    print(json.dumps(result))
    return result


def _transformers_version() -> str:
    import transformers

    return transformers.__version__




if __name__ == "__main__":
    main()
