"""`loopserve eval`: a checkpoint on the held-out test split, in exact and adaptive semantics.

Measures, with greedy decoding (training/decode.py):

- exact-match accuracy per task and difficulty, in exact semantics (every token runs N
  loop steps) and in adaptive semantics at the model's default halting threshold;
- token agreement: the exact-semantics greedy output, re-scored in adaptive semantics
  (fraction of its tokens that are also the adaptive argmax given the same prefix), and
  the fraction of problems whose two greedy outputs are identical;
- mean loops per layer (all tokens, and the answer positions: the positions that emit the
  answer) and against difficulty; memory-gate activity per layer and bank;
- compute saved = 1 - FLOPs / FLOPs at max depth (model/flops.py) over what a server
  would run: the prompt plus the generated tokens, logits at the positions that sample;
- answer cross-entropy (teacher-forced) in both semantics;
- a threshold sweep (teacher-forced exact match, which equals greedy exact match, and
  argmax agreement with exact semantics) that shows the accuracy / agreement / compute
  trade-off the default threshold was chosen from.

Writes eval.json and eval.png (matplotlib) into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.flops import token_flops
from model.looplm import LoopLM
from model.weights import BUNDLED_MODEL_DIR, load_model
from training.batching import IGNORE, chunks, collate, teacher_forced
from training.data import Corpus, Example
from training.decode import forward_each, greedy_decode

SWEEP = (0.0, 0.002, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5)


@dataclasses.dataclass
class Decoded:
    """One test example decoded in one semantics, with the stats of its served sequence."""

    example: Example
    generated: list[int]
    correct: bool
    depths: torch.Tensor | None = None  # [T, L] of prompt + generated[:-1]
    gates: torch.Tensor | None = None  # [T, L, 2]
    flops: int = 0
    flops_max_depth: int = 0


# ---------------------------------------------------------------------- decoding
def decode_all(model: LoopLM, examples: Sequence[Example], threshold: float | None,
               max_new_tokens: int) -> list[Decoded]:
    generated = greedy_decode(model, [e.prompt for e in examples], threshold, max_new_tokens)
    return [Decoded(e, g, g == e.answer_ids) for e, g in zip(examples, generated, strict=True)]


def served_ids(item: Decoded) -> list[int]:
    """What a server feeds through the model: the prompt and every generated token but the
    last (the last one is sampled and returned, never fed back)."""
    return item.example.prompt + item.generated[:-1]


@torch.no_grad()
def attach_depths(model: LoopLM, items: list[Decoded], threshold: float | None) -> None:
    """Fill depths, gates and FLOPs of each served sequence (a token's depth depends only on
    its prefix, so one whole-sequence forward gives the depths of incremental decoding)."""
    results = forward_each(model, [served_ids(i) for i in items], threshold)
    for item, (_, depths, gates) in zip(items, results, strict=True):
        item.depths, item.gates = depths, gates
        item.flops, item.flops_max_depth = sequence_flops(model, item)


def sequence_flops(model: LoopLM, item: Decoded) -> tuple[int, int]:
    """(FLOPs, FLOPs at max depth) of a served sequence; logits where a token is sampled."""
    cfg = model.config
    first_sampled = item.example.prompt_len - 1
    full = [cfg.max_loops] * cfg.n_layers
    flops = flops_max = 0
    for position, depth in enumerate(item.depths.tolist()):
        sampled = position >= first_sampled
        flops += token_flops(cfg, depth, position + 1, with_logits=sampled)
        flops_max += token_flops(cfg, full, position + 1, with_logits=sampled)
    return flops, flops_max


@torch.no_grad()
def token_agreement(model: LoopLM, exact: list[Decoded], threshold: float) -> dict[str, float]:
    """Fraction of the exact-semantics greedy tokens that adaptive semantics also picks,
    each given the same (exact-semantics) prefix: over all problems, and split by whether
    the exact-semantics answer is right."""
    results = forward_each(model, [served_ids(i) for i in exact], threshold)
    counts = {"all": [0, 0], "exact_right": [0, 0], "exact_wrong": [0, 0]}
    for item, (logits, _, _) in zip(exact, results, strict=True):
        picked = logits[answer_rows(item)].argmax(-1).tolist()  # [len(generated)]
        agree = sum(p == g for p, g in zip(picked, item.generated, strict=True))
        for key in ("all", "exact_right" if item.correct else "exact_wrong"):
            counts[key][0] += agree
            counts[key][1] += len(item.generated)
    return {key: round(a / max(n, 1), 4) for key, (a, n) in counts.items()}


@torch.no_grad()
def answer_cross_entropy(model: LoopLM, examples: Sequence[Example], threshold: float | None
                         ) -> float:
    """Mean cross-entropy of the reference answers' tokens (teacher-forced); finer than exact
    match for comparing checkpoints that still get most answers wrong."""
    total, count = 0.0, 0
    for part in chunks(examples, 128):
        batch = collate(part, model.config.pad_token_id)
        logits = model.reference_forward(batch.ids, halt_threshold=threshold).logits
        total += F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(),
                                 ignore_index=IGNORE, reduction="sum").item()
        count += int((batch.targets != IGNORE).sum())
    return total / max(count, 1)


# ---------------------------------------------------------------------- aggregation
def cell(example: Example) -> tuple[str, int]:
    return example.problem.task, example.problem.difficulty


def accuracy_table(items: list[Decoded]) -> dict[str, dict[str, float]]:
    """{task: {difficulty: exact-match accuracy}}."""
    hits: dict[tuple[str, int], list[bool]] = defaultdict(list)
    for item in items:
        hits[cell(item.example)].append(item.correct)
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for (task, difficulty), values in sorted(hits.items()):
        table[task][str(difficulty)] = round(sum(values) / len(values), 4)
    return dict(table)


def cell_counts(examples: Sequence[Example]) -> dict[str, dict[str, int]]:
    """{task: {difficulty: number of examples}} (each problem counts once per format)."""
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    for example in examples:
        task, difficulty = cell(example)
        counts[task][str(difficulty)] = counts[task].get(str(difficulty), 0) + 1
    return {task: dict(sorted(cells.items())) for task, cells in sorted(counts.items())}


def accuracy_of(items: list[Decoded], task: str, difficulties: Sequence[int],
                fmt: str | None = None) -> float:
    chosen = [i.correct for i in items if i.example.problem.task == task
              and i.example.problem.difficulty in difficulties
              and (fmt is None or i.example.format == fmt)]
    return round(sum(chosen) / max(len(chosen), 1), 4)


def answer_rows(item: Decoded) -> slice:
    """Positions of the served sequence that emit answer tokens."""
    return slice(item.example.prompt_len - 1, None)


def loop_stats(items: list[Decoded]) -> dict[str, Any]:
    """Mean loops per layer (all tokens / answer positions) and per task and difficulty."""
    all_depths = torch.cat([i.depths for i in items]).float()  # [tokens, L]
    answer_depths = torch.cat([i.depths[answer_rows(i)] for i in items]).float()
    by_cell: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
    for item in items:
        by_cell[cell(item.example)].append(item.depths[answer_rows(item)].float())
    per_difficulty: dict[str, dict[str, float]] = defaultdict(dict)
    for (task, difficulty), depths in sorted(by_cell.items()):
        per_difficulty[task][str(difficulty)] = round(torch.cat(depths).mean().item(), 4)
    return {"loops_per_layer": _rounded(all_depths.mean(0)),
            "answer_loops_per_layer": _rounded(answer_depths.mean(0)),
            "mean_loops_per_token": round(all_depths.mean().item(), 4),
            "answer_loops_by_difficulty": dict(per_difficulty)}


def gate_stats(items: list[Decoded]) -> dict[str, list[float]]:
    gates = torch.cat([i.gates for i in items])  # [tokens, L, 2]
    return {"local": _rounded(gates[:, :, 0].mean(0)), "global": _rounded(gates[:, :, 1].mean(0))}


def compute_saved(items: list[Decoded]) -> dict[str, float]:
    """1 - FLOPs / FLOPs at max depth, overall and per task."""
    def saved(chosen: list[Decoded]) -> float:
        used = sum(i.flops for i in chosen)
        return round(1 - used / max(sum(i.flops_max_depth for i in chosen), 1), 4)
    tasks = sorted({i.example.problem.task for i in items})
    return {"all": saved(items),
            **{t: saved([i for i in items if i.example.problem.task == t]) for t in tasks}}


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in values]


# ---------------------------------------------------------------------- threshold sweep
@torch.no_grad()
def threshold_sweep(model: LoopLM, examples: list[Example], thresholds: Sequence[float]
                    ) -> list[dict[str, float]]:
    """Per threshold, teacher-forced on the reference answers: exact match, agreement of the
    answer-position argmax with exact semantics, mean loops and compute saved."""
    parts = list(chunks(examples, 128))
    reference = [teacher_forced(model, part, None).predicted for part in parts]
    return [_sweep_row(model, parts, reference, eps) for eps in thresholds]


def _sweep_row(model: LoopLM, parts: list[Sequence[Example]], reference: list[torch.Tensor],
               eps: float) -> dict[str, float]:
    correct, items, agree, scored_total = [], [], 0, 0
    for part, exact_argmax in zip(parts, reference, strict=True):
        tf = teacher_forced(model, part, eps)
        correct += tf.correct.tolist()
        scored = tf.batch.targets != IGNORE
        agree += int(((tf.predicted == exact_argmax) & scored).sum())
        scored_total += int(scored.sum())
        items += [Decoded(e, e.answer_ids, True, depths=tf.depths[row, :len(e.ids) - 1])
                  for row, e in enumerate(part)]
    for item in items:
        item.flops, item.flops_max_depth = sequence_flops(model, item)
    return {"threshold": eps, "accuracy": round(sum(correct) / len(correct), 4),
            "agreement": round(agree / max(scored_total, 1), 4),
            "mean_loops": round(torch.cat([i.depths for i in items]).float().mean().item(), 4),
            "compute_saved": compute_saved(items)["all"]}


# ---------------------------------------------------------------------- the report
def evaluate(model: LoopLM, examples: list[Example], threshold: float, max_new_tokens: int = 16,
             sweep: Sequence[float] = SWEEP) -> dict[str, Any]:
    """Every number of the module docstring, as one JSON-ready dict."""
    exact = decode_all(model, examples, None, max_new_tokens)
    adaptive = decode_all(model, examples, threshold, max_new_tokens)
    agreement = token_agreement(model, exact, threshold)
    attach_depths(model, adaptive, threshold)
    same = [a.generated == e.generated for a, e in zip(adaptive, exact, strict=True)]
    loops = loop_stats(adaptive)
    return {
        "threshold": threshold,
        "max_loops": model.config.max_loops,
        "test_examples": len(examples),
        "test_counts": cell_counts(examples),
        "accuracy": {"exact": accuracy_table(exact), "adaptive": accuracy_table(adaptive)},
        "token_agreement": agreement["all"],
        "token_agreement_by_exact_answer": agreement,
        "answer_cross_entropy": {
            "exact": round(answer_cross_entropy(model, examples, None), 4),
            "adaptive": round(answer_cross_entropy(model, examples, threshold), 4)},
        "sequence_agreement": round(sum(same) / len(same), 4),
        **loops,
        "memory_gate_per_layer": gate_stats(adaptive),
        "compute_saved": compute_saved(adaptive),
        "targets": targets(exact, adaptive, loops, gate_stats(adaptive)),
        "threshold_sweep": threshold_sweep(model, examples, sweep),
        "examples": [_show(i) for i in adaptive[::max(1, len(adaptive) // 12)]],
    }


def targets(exact: list[Decoded], adaptive: list[Decoded], loops: dict[str, Any],
            gates: dict[str, list[float]]) -> dict[str, Any]:
    """The numbers the bundled model has goals on (adaptive semantics is what is served)."""
    per_layer = loops["loops_per_layer"]
    memory = [a + b for a, b in zip(gates["local"], gates["global"], strict=True)]
    half = len(per_layer) // 2
    return {
        "add_2_3_digit_exact_match": accuracy_of(adaptive, "add", (2, 3)),
        "add_2_3_digit_exact_match_exact_semantics": accuracy_of(exact, "add", (2, 3)),
        "add_2_digit_exact_match": accuracy_of(adaptive, "add", (2,)),
        "add_3_digit_exact_match": accuracy_of(adaptive, "add", (3,)),
        "sub_exact_match": accuracy_of(adaptive, "sub", (1, 2, 3, 4)),
        "mul_exact_match": accuracy_of(adaptive, "mul", (1, 2, 3, 4)),
        "fact_recall": accuracy_of(adaptive, "fact", (1,)),
        "fact_recall_exact_semantics": accuracy_of(exact, "fact", (1,)),
        "later_layers_loop_more": sum(per_layer[half:]) > sum(per_layer[:half]),
        "later_layers_read_memory_more": sum(memory[half:]) > sum(memory[:half]),
    }


def _show(item: Decoded) -> dict[str, Any]:
    from model.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    return {"format": item.example.format,
            "prompt": tok.decode(item.example.prompt, skip_special=False),
            "expected": tok.decode(item.example.answer_ids),
            "generated": tok.decode(item.generated), "correct": item.correct}


# ---------------------------------------------------------------------- command line
def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Evaluate a checkpoint on the held-out "
                                "test split in exact and adaptive semantics.")
    p.add_argument("--model", default=str(BUNDLED_MODEL_DIR), help="checkpoint directory")
    p.add_argument("--out", default=None, help="where eval.json and eval.png go "
                   "(default: the checkpoint directory)")
    p.add_argument("--threshold", type=float, default=None,
                   help="adaptive halting threshold (default: the model's)")
    p.add_argument("--per-cell", type=int, default=100,
                   help="distinct test problems per (task, difficulty); facts: all")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--data-seed", type=int, default=0, help="the corpus seed it was trained on")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    return p


def main(argv: list[str]) -> int:
    args = build_parser(f"loopserve {argv[0]}").parse_args(argv[1:])
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    threshold = model.config.halt_threshold if args.threshold is None else args.threshold
    examples = Corpus(args.data_seed).held_out(args.split, args.per_cell)
    started = time.perf_counter()
    report = {"model": args.model, "split": args.split,
              **evaluate(model, examples, threshold)}
    report["wall_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out or args.model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_plot:
        from training.plots import plot_eval
        plot_eval(report, out / "eval.png")
    print(json.dumps({k: report[k] for k in ("targets", "token_agreement", "compute_saved",
                                             "loops_per_layer", "wall_s")}), file=sys.stdout)
    return 0
