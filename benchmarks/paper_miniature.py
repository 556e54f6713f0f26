"""A miniature of the paper's comparison: base, Loop-3, Mem, Loop-3 + Mem and the iso-FLOP
dense model, trained on the same synthetic corpus with the same steps, width and seeds.

    python -m benchmarks.paper_miniature --seeds 0 1      # train and evaluate every variant
    python -m benchmarks.paper_miniature --only loop3_mem --seeds 2

Each run trains with `training.train` into `runs/miniature/<variant>-s<seed>/` (resumable:
a killed run continues from its last checkpoint) and is then measured on the held-out test
split, teacher-forced in both semantics (an answer is right when every answer token and its
<eos> is the argmax, which is greedy exact match without a decode loop). One JSON file per
run lands in `benchmarks/results/paper_miniature/`; a run whose file exists is skipped.
`python -m benchmarks.paper_miniature_report` turns the files into the table and figure of
`benchmarks/paper_miniature.md`. Every finished run also prints its JSON on one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.flops import parameter_count, sequence_matmul_flops
from model.looplm import LoopLM
from training.batching import IGNORE, chunks, teacher_forced
from training.data import Corpus, Example
from training.train import TrainConfig, train

RESULTS = Path("benchmarks/results/paper_miniature")
RUNS = Path("runs/miniature")

# one width for every variant; the base has 2 layers, the iso-FLOP dense model 3x as many
WIDTH = ModelConfig(
    d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden=192,
    max_loops=3, local_memory_slots=32, global_memory_slots=64, max_position=256,
    loop_scale_init=0.0, halt_threshold=0.01)
NO_MEMORY = {"local_memory_slots": 0, "global_memory_slots": 0}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of the comparison: model config changes and training changes."""

    name: str
    label: str
    model: dict[str, Any]
    ponder_weight: float = TrainConfig.ponder_weight

    def config(self) -> ModelConfig:
        return WIDTH.replace(**self.model)


VARIANTS = {v.name: v for v in (
    Variant("base", "Base (1 loop, no memory)", {"max_loops": 1, **NO_MEMORY}),
    Variant("loop3", "Loop-3", {"max_loops": 3, **NO_MEMORY}),
    Variant("mem", "Mem (1 loop + memory)", {"max_loops": 1}),
    Variant("loop3_mem", "Loop-3 + Mem", {"max_loops": 3}),
    Variant("dense_iso", "Dense, 3x layers (iso-FLOP)",
            {"n_layers": 3 * WIDTH.n_layers, "max_loops": 1, **NO_MEMORY}),
    # the paper's settings, for layer specialisation: no ponder penalty; gate bias +3
    Variant("loop3_mem_ponder0", "Loop-3 + Mem, ponder weight 0", {"max_loops": 3}, 0.0),
    Variant("loop3_mem_gate3", "Loop-3 + Mem, gate bias +3", {"max_loops": 3,
                                                              "gate_bias_init": 3.0}),
)}
COMPARISON = ("base", "loop3", "mem", "loop3_mem", "dense_iso")


def train_config(variant: Variant, seed: int, steps: int, batch_size: int, runs: Path = RUNS
                 ) -> TrainConfig:
    """The same recipe for every arm; only the seed (init and data order) varies."""
    return TrainConfig(
        out_dir=str(runs / f"{variant.name}-s{seed}"), steps=steps, batch_size=batch_size,
        warmup_steps=min(TrainConfig.warmup_steps, steps), seed=seed, semantics="mixed",
        ponder_weight=variant.ponder_weight,
        eval_every=max(steps // 4, 1), log_every=50, val_per_cell=8, threads=1)


# ---------------------------------------------------------------------- measuring
def cell_key(example: Example) -> str:
    task = example.problem.task
    return task if task in ("fact", "expr") else f"{task}{example.problem.difficulty}"


@dataclasses.dataclass
class _Tally:
    """Sums over the examples of one semantics."""

    hits: dict[str, list[bool]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    nats: dict[str, float] = dataclasses.field(default_factory=lambda: defaultdict(float))
    answer_bytes: dict[str, int] = dataclasses.field(default_factory=lambda: defaultdict(int))
    depth_sum: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))
    gate_sum: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(()))
    tokens: int = 0

    def add(self, part: Sequence[Example], model: LoopLM, threshold: float | None) -> None:
        tf = teacher_forced(model, part, threshold)
        batch = tf.batch
        scored = batch.targets != IGNORE  # [B, T]
        nats = F.cross_entropy(tf.logits.transpose(1, 2), batch.targets, ignore_index=IGNORE,
                               reduction="none")  # [B, T]
        for example, ok, row_nats, n in zip(part, tf.correct.tolist(), nats.sum(1).tolist(),
                                            scored.sum(1).tolist(), strict=True):
            self.hits[cell_key(example)].append(ok)
            self.nats[example.problem.task] += row_nats
            self.answer_bytes[example.problem.task] += n
        self.depth_sum = self.depth_sum + tf.depths[batch.real].float().sum(0)  # [L]
        self.gate_sum = self.gate_sum + tf.gates[batch.real].sum(0)  # [L, 2]
        self.tokens += int(batch.real.sum())

    def result(self) -> dict[str, Any]:
        bits = {t: round(self.nats[t] / self.answer_bytes[t] / math.log(2), 4)
                for t in sorted(self.nats)}
        total = sum(self.nats.values()) / sum(self.answer_bytes.values()) / math.log(2)
        return {"exact_match": {k: round(sum(v) / len(v), 4)
                                for k, v in sorted(self.hits.items())},
                "answer_bits_per_byte": round(total, 4),
                "answer_bits_per_byte_by_task": bits,
                "loops_per_layer": [round(x, 3) for x in
                                    (self.depth_sum / self.tokens).tolist()],
                "gates_per_layer": [[round(x, 4) for x in row]
                                    for row in (self.gate_sum / self.tokens).tolist()]}


@torch.no_grad()
def measure(model: LoopLM, examples: list[Example]) -> dict[str, Any]:
    """Exact match per task and difficulty and answer bits per byte (a byte tokenizer: one
    token is one byte; the <eos> counts) in both semantics; loops and memory gates per
    layer; all from one teacher-forced forward per batch and semantics."""
    model.eval()
    result: dict[str, Any] = {}
    for name, threshold in (("exact", None), ("adaptive", model.config.halt_threshold)):
        tally = _Tally()
        for part in chunks(examples, 128):
            tally.add(part, model, threshold)
        result[name] = tally.result()
    result["cell_sizes"] = {k: len(v) for k, v in sorted(tally.hits.items())}
    return result


def run_one(variant: Variant, seed: int, steps: int, batch_size: int,
            examples: list[Example], runs: Path = RUNS, per_cell: int | None = None
            ) -> dict[str, Any]:
    cfg = train_config(variant, seed, steps, batch_size, runs)
    model_cfg = variant.config()
    state = train(model_cfg, cfg, resume=True)
    return {"variant": variant.name, "label": variant.label, "seed": seed, "steps": steps,
            "batch_size": batch_size, "ponder_weight": variant.ponder_weight,
            "test_per_cell": per_cell, "test_examples": len(examples),
            "train_minutes": round(state.elapsed_s / 60, 2),
            "model_config": model_cfg.to_dict(), "parameters": parameter_count(model_cfg),
            "flops_per_token_max_depth": sequence_matmul_flops(model_cfg, 1),
            **measure(state.model, examples)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paper_miniature",
                                description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--per-cell", type=int, default=100,
                   help="distinct test problems per (task, difficulty); facts: all")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=RUNS, help="where the run directories go")
    args = p.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    examples = Corpus(0).held_out("test", args.per_cell)
    for seed in args.seeds:  # seed-major: a cut-short session still has every variant once
        for name in args.only:
            path = args.results / f"{name}-s{seed}.json"
            if path.is_file():
                continue
            print(f"== {name} seed {seed}", file=sys.stderr, flush=True)
            record = run_one(VARIANTS[name], seed, args.steps, args.batch_size, examples,
                             args.runs, args.per_cell)
            path.write_text(json.dumps(record, indent=1) + "\n")
            print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
