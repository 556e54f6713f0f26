"""The decode attention's k/v gather: how v0 read the paged pool against how it reads now.

One decode attention call (`AttentionPlan._attend_decodes` of `engine/paged_attention.py`)
reads every row's blocks of one plane out of the pool (blocks scattered over it, as a
served pool's are) and attends. Per (batch, context) this times, in interleaved rounds:

    aten_index        cache[blocks, plane]: aten's multi-index gather (v0)
    select_fresh      index_select of whole blocks into a fresh tensor (what a captured
                      CUDA graph does, from its own pool)
    select_workspace  the same into the runner's reusable `GatherWorkspace` (eager steps)
    attend_v0         aten_index + the masked SDPA
    attend_gqa        select_workspace + SDPA with `enable_gqa` (the call before
                      2026-12-03: k/v repeated for each query head of a group)
    attend_now        the plan's call: select_workspace + the SDPA with each kv head's
                      query group as its query positions (no k/v repeat for GQA)
    flex_in_place     (`--flex`) the engine's `--attention-backend flex` call
                      (`engine/flex_paged.py`): FlexAttention reading the pool where it
                      lies, no copy; compiled on first use (seconds on a CPU).
    triton_in_place   (`--triton`, CUDA) the `--attention-backend triton` kernel
                      (`engine/triton_paged.py`): each row's blocks read in place, to its
                      length; and triton_half_halted, every other row halted (one key)

and reports seconds per call, ratios to v0, and the gather's achieved bytes/s against the
machine's measured copy rate (a gather reads and writes each byte once).

    python -m benchmarks.paged_gather                                   # paper shapes, bf16
    python -m benchmarks.paged_gather --batches 8 --contexts 64 --dtype fp32 --preset tiny
    python -m benchmarks.paged_gather --device cuda --batches 64,256 --contexts 1024 --flex \
        --triton
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.engine_throughput import copy_rate
from benchmarks.machine import machine_name, sync
from engine import get_preset
from engine.flex_paged import FlexDecode
from engine.paged_attention import AttentionPlan, GatherWorkspace, gather_blocks
from engine.step_upload import StepUpload
from engine.triton_paged import TritonDecode
from model.weights import resolve_dtype


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper-loop3-mem")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--contexts", default="64,256,1024")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flex", action="store_true",
                        help="also time FlexAttention over the pool in place (compiles)")
    parser.add_argument("--triton", action="store_true",
                        help="also time the Triton paged kernel in place (CUDA)")
    return parser.parse_args(argv)


def _plan(batch: int, context: int, block_size: int, num_blocks: int, device: str,
          workspace: GatherWorkspace) -> AttentionPlan:
    """`batch` decodes at position context - 1, their blocks a random draw from the pool."""
    width = -(-context // block_size)
    picks = torch.randperm(num_blocks)[:batch * width].view(batch, width).tolist()
    upload = StepUpload(torch.device(device))
    upload.add("positions", [context - 1] * batch)
    layout = AttentionPlan.pack(upload, picks, [context - 1] * batch, [1] * batch, batch,
                                block_size)
    return AttentionPlan.build(layout, upload.upload(), workspace)


def _sdpa_gqa(plan: AttentionPlan, kv: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """kv [n, W * bs, 2, Hkv, hd] -> [n, H * hd]: SDPA with `enable_gqa` (k/v repeated for
    each query head of a group), the call before 2026-12-03."""
    k, v = kv[:, :, 0], kv[:, :, 1]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=plan.decode_key_valid[:, None, None, :], enable_gqa=True)  # [n, H, 1, hd]
    return out.flatten(1)


def _attend_v0(plan: AttentionPlan, cache: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return _sdpa_gqa(plan, cache[plan.decode_blocks, 1].flatten(1, 2), q)


def _attend_gqa(plan: AttentionPlan, cache: torch.Tensor, q: torch.Tensor,
                workspace: GatherWorkspace) -> torch.Tensor:
    return _sdpa_gqa(plan, gather_blocks(cache, 1, plan.decode_blocks, workspace), q)


def _seconds(fn, device: str, calls: int) -> float:
    """Seconds per call over `calls` calls."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def _calls_per_sample(fn, device: str, target_s: float = 0.005) -> int:
    """Enough calls for a sample to last `target_s` (small gathers take microseconds)."""
    once = _seconds(fn, device, 1)
    return max(1, min(1000, round(target_s / max(once, 1e-7))))


def _tolerance(dtype: torch.dtype) -> dict:
    return {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4,
                                                                           "atol": 1e-5}


def _add_triton(args, variants: dict, cache: torch.Tensor, q: torch.Tensor, plan,
                want: torch.Tensor) -> str | None:
    """The Triton paged kernel reading the pool in place (every row its context), and the
    same with every other row halted (one key each, as the masked form has it); returns
    why it could not run, if it could not."""
    try:
        kernel = TritonDecode(torch.device(args.device), cache.shape[-1])
        blocks, contexts = plan.decode_blocks, plan.decode_contexts
        halted = contexts.clone()
        halted[1::2] = 1
        torch.testing.assert_close(kernel.attend(cache, 1, q, blocks, contexts), want,
                                   **_tolerance(cache.dtype))
        variants["triton_in_place"] = lambda: kernel.attend(cache, 1, q, blocks, contexts)
        variants["triton_half_halted"] = lambda: kernel.attend(cache, 1, q, blocks, halted)
    except Exception as exc:  # noqa: BLE001 - a backend that cannot run here: say so
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


def measure(args: argparse.Namespace, batch: int, context: int, dtype: torch.dtype) -> dict:
    cfg = get_preset(args.preset)
    width = -(-context // args.block_size)
    num_blocks = batch * width + 1
    cache = torch.randn(num_blocks, cfg.max_loops, args.block_size, 2, cfg.n_kv_heads,
                        cfg.head_dim, device=args.device).to(dtype)
    q = torch.randn(batch, cfg.n_heads, cfg.head_dim, device=args.device).to(dtype)
    workspace = GatherWorkspace()
    plan = _plan(batch, context, args.block_size, num_blocks, args.device, workspace)
    blocks = plan.decode_blocks
    variants = {
        "aten_index": lambda: cache[blocks, 1],
        "select_fresh": lambda: gather_blocks(cache, 1, blocks, None),
        "select_workspace": lambda: gather_blocks(cache, 1, blocks, workspace),
        "attend_v0": lambda: _attend_v0(plan, cache, q),
        "attend_gqa": lambda: _attend_gqa(plan, cache, q, workspace),
        "attend_now": lambda: plan.attend(cache, 1, None, q),
    }
    want = variants["attend_v0"]()
    torch.testing.assert_close(variants["attend_now"](), want, **_tolerance(dtype))
    flex_error = None
    if args.flex:
        try:
            flex = FlexDecode(torch.device(args.device), batch)
            contexts = plan.decode_contexts

            def in_place():  # a mask per call, as a step's first layer builds it
                return flex.attend(cache, q, flex.mask(cache, 1, blocks, contexts))

            torch.testing.assert_close(in_place(), want, **_tolerance(dtype))
            variants["flex_in_place"] = in_place
        except Exception as exc:  # a backend that cannot run this shape: say so, go on
            flex_error = f"{type(exc).__name__}: {str(exc)[:300]}"
    triton_error = _add_triton(args, variants, cache, q, plan, want) if args.triton else None
    calls = {name: _calls_per_sample(fn, args.device) for name, fn in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            times[name].append(_seconds(fn, args.device, calls[name]))
    median = {name: statistics.median(t) for name, t in times.items()}
    gathered = blocks.numel() * cache[0, 0].numel() * cache.element_size()
    extra = {} if not args.flex else {
        "flex_error": flex_error,
        "flex_over_now": median["flex_in_place"] / median["attend_now"]
        if "flex_in_place" in median else None}
    if args.triton:
        extra.update(triton_error=triton_error, **({
            "triton_over_now": median["triton_in_place"] / median["attend_now"],
            "triton_half_halted_over_all": median["triton_half_halted"]
            / median["triton_in_place"],
            "triton_bytes_per_s": gathered / median["triton_in_place"]}
            if "triton_in_place" in median else {}))
    return {"batch": batch, "context": context, "gathered_bytes": gathered, **extra,
            "seconds": median,
            "gather_over_v0": median["select_workspace"] / median["aten_index"],
            "attend_over_v0": median["attend_now"] / median["attend_v0"],
            "attend_over_gqa": median["attend_now"] / median["attend_gqa"],
            "gather_bytes_per_s": 2 * gathered / median["select_workspace"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = resolve_dtype(args.dtype)
    peak = copy_rate(args.device)
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            row = measure(args, batch, context, dtype)
            row["gather_fraction_of_copy_rate"] = row["gather_bytes_per_s"] / peak
            results.append(row)
            print(f"batch {batch} context {context}: gather {row['gather_over_v0']:.2f}x v0, "
                  f"attention {row['attend_over_v0']:.2f}x v0, "
                  f"{row['attend_over_gqa']:.2f}x enable_gqa", file=sys.stderr, flush=True)
    out = {"benchmark": "paged_gather", "machine": machine_name(args.device),
           "device": args.device, "dtype": str(dtype), "preset": args.preset,
           "threads": torch.get_num_threads(), "block_size": args.block_size,
           "rounds": args.rounds, "measured_copy_bytes_per_s": peak, "results": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
