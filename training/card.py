"""Ship a trained run as the bundled model: copy its files, evaluate, write the model card.

    python -m training.card --run runs/loopserve-tiny --dest models/loopserve-tiny \\
        --threshold 0.1 --compare exact=runs/cmp-exact/val/eval.json ...

`dest` receives config.json (with the chosen default `halt_threshold`), model.safetensors,
the Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json with the chat
template; `model.tokenizer.write_hf_tokenizer_files`), eval.json + eval.png (`loopserve
eval`), training.png (the run's log) and README.md, whose every number is read from those
files; the card's hand-written notes (after NOTES_MARKER) survive a rewrite.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from model.config import ModelConfig
from model.flops import parameter_count
from model.tokenizer import write_hf_tokenizer_files
from training import evaluate
from training.data import DIFFICULTIES, EXTRA_FRAMES, FACT_QUESTIONS, Corpus, Mixture
from training.plots import plot_training
from training.train import TrainConfig, lr_at

NOTES_MARKER = "<!-- notes: written by hand below this line; training/card.py keeps them -->"
TARGETS = (  # (label, key in the eval report, goal: met when measured >= goal)
    ("2-digit addition, exact match", "add_2_digit_exact_match", 0.95),
    ("3-digit addition, exact match", "add_3_digit_exact_match", 0.90),
    ("fact recall in held-out phrasings", "fact_recall", 0.95),
    ("adaptive vs exact token agreement", "token_agreement", 0.99),
    ("compute saved at the default threshold", "compute_saved", 0.40),
)
# the previous bundled model's test figures (its eval.json at commit 2bafd58): the goals ask
# for better subtraction and multiplication than these
PREVIOUS = {"sub_exact_match": 0.0327, "mul_exact_match": 0.1739}


def ship(run: Path, dest: Path, threshold: float | None) -> ModelConfig:
    """Copy the run's model into dest, setting the default halting threshold."""
    dest.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.load(run / "config.json")
    if threshold is not None:
        config = config.replace(halt_threshold=threshold)
    config.save(dest / "config.json")
    shutil.copy(run / "model.safetensors", dest / "model.safetensors")
    write_hf_tokenizer_files(dest, config)
    return config


def read_log(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line]


# ---------------------------------------------------------------------- card sections
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def target_rows(report: dict[str, Any]) -> list[str]:
    values = {**report["targets"], "token_agreement": report["token_agreement"],
              "compute_saved": report["compute_saved"]["all"]}
    rows = ["| target | goal | measured | |", "|---|---|---|---|"]
    for label, key, goal in TARGETS:
        met = "met" if values[key] >= goal else "**missed**"
        rows.append(f"| {label} | >= {_pct(goal)} | {_pct(values[key])} | {met} |")
    t = report["targets"]
    for label, key in (("subtraction", "sub_exact_match"), ("multiplication",
                                                            "mul_exact_match")):
        if key in t:
            better = "met" if t[key] > PREVIOUS[key] else "**missed**"
            rows.append(f"| {label}, exact match (all digits) | better than the previous "
                        f"{_pct(PREVIOUS[key])} | {_pct(t[key])} | {better} |")
    rows.append(f"| later layers loop more than early ones | (paper: yes) | "
                f"{'yes' if t['later_layers_loop_more'] else '**no**'} | |")
    rows.append(f"| later layers read memory more | (paper: yes) | "
                f"{'yes' if t['later_layers_read_memory_more'] else '**no**'} | |")
    return rows


def accuracy_rows(report: dict[str, Any]) -> list[str]:
    rows = ["| task | difficulty | test examples | exact semantics | adaptive semantics "
            "| loops at answer |", "|---|---|---|---|---|---|"]
    loops, counts = report["answer_loops_by_difficulty"], report["test_counts"]
    for task, cells in report["accuracy"]["adaptive"].items():
        for difficulty, acc in cells.items():
            exact = report["accuracy"]["exact"][task][difficulty]
            rows.append(f"| {task} | {difficulty} | {counts[task][difficulty]} | {_pct(exact)} "
                        f"| {_pct(acc)} | {loops[task][difficulty]:.2f} |")
    return rows


def layer_rows(report: dict[str, Any]) -> list[str]:
    gates = report["memory_gate_per_layer"]
    rows = ["| layer | mean loops (all tokens) | mean loops (answer) | local gate | global gate |",
            "|---|---|---|---|---|"]
    for i, loops in enumerate(report["loops_per_layer"]):
        rows.append(f"| {i + 1} | {loops:.2f} | {report['answer_loops_per_layer'][i]:.2f} | "
                    f"{gates['local'][i]:.3f} | {gates['global'][i]:.3f} |")
    return rows


def sweep_rows(report: dict[str, Any]) -> list[str]:
    rows = ["| threshold | exact match (all tasks) | agreement with exact semantics | mean loops "
            "| compute saved |", "|---|---|---|---|---|"]
    for r in report["threshold_sweep"]:
        rows.append(f"| {r['threshold']} | {_pct(r['accuracy'])} | {_pct(r['agreement'])} | "
                    f"{r['mean_loops']:.2f} | {_pct(r['compute_saved'])} |")
    return rows


def comparison_rows(compare: dict[str, dict[str, Any]]) -> list[str]:
    rows = ["| trained in | answer CE, exact | answer CE, adaptive (served) | token agreement "
            "| mean loops | compute saved |", "|---|---|---|---|---|---|"]
    for name, r in compare.items():
        ce = r["answer_cross_entropy"]
        rows.append(f"| {name} | {ce['exact']:.3f} | {ce['adaptive']:.3f} | "
                    f"{_pct(r['token_agreement'])} | {r['mean_loops_per_token']:.2f} | "
                    f"{_pct(r['compute_saved']['all'])} |")
    return rows


def example_rows(report: dict[str, Any]) -> list[str]:
    rows = ["| format | prompt | expected | generated |", "|---|---|---|---|"]
    for e in report["examples"]:
        prompt = e["prompt"].replace("\n", "\\n").replace("|", "\\|")
        rows.append(f"| {e['format']} | `{prompt}` | `{e['expected']}` | `{e['generated']}` |")
    return rows


def training_facts(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's sessions (a resumed run has several), steps, wall time and final loss."""
    starts = [r for r in records if r["event"] == "start"]
    train = [r for r in records if r["event"] == "train"]
    val = [r for r in records if r["event"] == "val"]
    return {"starts": starts, "cfg": starts[-1]["train_config"], "steps": train[-1]["step"],
            "wall_min": val[-1]["elapsed_s"] / 60, "final_ce": train[-1]["ce"]}


# TrainConfig field -> its `loopserve train` flag, where the two names differ
FLAGS = {"train_threshold": "threshold", "task_mix": "mix"}
NOT_FLAGS = ("out_dir", "min_lr_ratio", "grad_clip")  # --out is always given; no flags


def train_commands(facts: dict[str, Any]) -> list[str]:
    """One `loopserve train` command per session of the run (later ones with --resume),
    naming every setting that differs from the defaults."""
    defaults = TrainConfig()
    commands = []
    for start in facts["starts"]:
        c = start["train_config"]
        flags = [_flag(k, v) for k, v in c.items()
                 if k not in NOT_FLAGS and v != getattr(defaults, k, v)]
        resume = " --resume" if start["step"] > 0 else ""
        commands.append(f"loopserve train --out {c['out_dir']} {' '.join(flags)}{resume}")
    return commands


def _flag(field: str, value: Any) -> str:
    """`--name value`, or the bare switch of a boolean field that is on."""
    name = f"--{FLAGS.get(field, field).replace('_', '-')}"
    return name if value is True else f"{name} {value}"


# ---------------------------------------------------------------------- the card
def write_card(dest: Path, config: ModelConfig, report: dict[str, Any],
               records: list[dict[str, Any]], compare: dict[str, dict[str, Any]]) -> None:
    facts = training_facts(records)
    corpus = Corpus(facts["cfg"]["data_seed"], mixture=_mixture(facts["cfg"]),
                    extra_phrasings=facts["cfg"].get("extra_phrasings", False))
    lines = [
        *_header_lines(dest, config, facts), "",
        *_answers_lines(report, corpus), "",
        *_model_lines(config), "",
        "## Data", "", *_data_lines(corpus), "",
        *_training_lines(facts), "",
        *_semantics_lines(facts["cfg"], compare), "",
        "![training](training.png)", "",
        *_results_lines(report, config), "",
        *_reproduce_lines(facts, config), "",
        *kept_notes(dest / "README.md"),
    ]
    (dest / "README.md").write_text("\n".join(lines) + "\n")


def _header_lines(dest: Path, config: ModelConfig, facts: dict[str, Any]) -> list[str]:
    size_mb = (dest / "model.safetensors").stat().st_size / 1e6
    return [
        "# loopserve-tiny", "",
        f"The model `loopserve serve` loads by default: a "
        f"{parameter_count(config) / 1e6:.2f}M-parameter looped transformer with gated memory "
        f"({size_mb:.1f} MB, fp32), trained {_origin(facts)} to add, subtract and multiply "
        "small numbers and to recall a table of invented facts. How well it does each, and "
        "how its loops and memory reads spread, is measured below. It is a test-and-demo "
        "model, not a language model: it knows only the corpus below.",
    ]


def _origin(facts: dict[str, Any]) -> str:
    minutes = f"{facts['wall_min']:.0f} minutes on a 2-core CPU"
    init = facts["cfg"].get("init_from", "")
    if not init:
        return f"from scratch in {minutes}"
    return (f"for {minutes}, starting from the weights of `{init}` as it was then (see "
            "Training and the notes)")


def _answers_lines(report: dict[str, Any], corpus: Corpus) -> list[str]:
    return [
        "## What it answers", "",
        "Byte tokenizer (ids 0-255 are bytes; `<pad>`=256, `<bos>`=257, `<eos>`=258, "
        "`<|system|>`/`<|user|>`/`<|assistant|>`=259/260/261). Greedy decoding, stop at `<eos>`.",
        "",
        "- chat: `<bos><|user|>What is 123+456?<eos><|assistant|>` -> `579<eos>` "
        "(also `Compute ...` / `Calculate ...`, with or without spaces around the operator)",
        "- chat: `<bos><|user|>What is the capital of Veltria?<eos><|assistant|>` -> the name",
        "- plain completion: `<bos>123+456=` -> `579<eos>`",
        "- plain completion: `<bos>Q: What is the capital of Veltria?\\nA:` -> ` Name<eos>`",
        "",
        "Arithmetic: add / sub with two operands of 1-4 digits (results may be negative), mul "
        "of a 1-4 digit number by a 1-digit number, expressions of 2-4 operators (+ - *) over "
        f"1-digit numbers with the usual precedence. Facts: {len(corpus.world.countries)} "
        f"invented countries x {len(FACT_QUESTIONS)} relations ({', '.join(FACT_QUESTIONS)}), "
        f"e.g. {_fact_examples(corpus)}. Real-world names are not in its data.",
        "",
        "Sample of held-out test problems (adaptive semantics, default threshold):", "",
        *example_rows(report),
    ]


def _model_lines(config: ModelConfig) -> list[str]:
    return [
        "## Model", "",
        f"`config.json`: d_model {config.d_model}, {config.n_layers} layers, {config.n_heads} "
        f"heads ({config.n_kv_heads} kv heads, head_dim {config.head_dim}), SwiGLU "
        f"{config.ffn_hidden}, max_loops {config.max_loops}, local memory "
        f"{config.local_memory_slots} slots per layer, global memory "
        f"{config.global_memory_slots} slots, max_position {config.max_position}. "
        f"`loop_scale_init` {config.loop_scale_init} (softplus(0) = 0.69: every loop step "
        "contributes from the start; the engine default of -7 makes the steps nearly "
        "identity maps, which is too slow to train in this budget). Default "
        f"`halt_threshold` {config.halt_threshold}, chosen from the threshold sweep below.",
    ]


def _training_lines(facts: dict[str, Any]) -> list[str]:
    cfg = facts["cfg"]
    commands = "; then ".join(f"`{c}`" for c in train_commands(facts))
    return [
        "## Training", "",
        f"{commands} (everything else default: batch {cfg['batch_size']}, AdamW lr "
        f"{cfg['lr']} betas (0.9, 0.95), weight decay {cfg['weight_decay']} on matrices, "
        f"{cfg['warmup_steps']} warmup steps then cosine to {cfg['min_lr_ratio']}x, grad clip "
        f"{cfg['grad_clip']}, ponder weight {cfg['ponder_weight']}, seed {cfg['seed']}, data "
        f"seed {cfg['data_seed']}). {_resume_note(facts)}{facts['steps']} steps, "
        f"{facts['steps'] * cfg['batch_size']:,} examples, **{facts['wall_min']:.1f} minutes** "
        "of training wall time on a 2-core CPU shared with other work; final answer "
        f"cross-entropy {facts['final_ce']:.3f}.{_init_note(cfg)}",
        "",
        "The loss is the cross-entropy of the answer tokens (prompts are not scored) plus the "
        "ponder penalty: `ponder_weight * (mean expected loop steps of every real token - 1) "
        "/ (N - 1)`.",
    ]


def _init_note(cfg: dict[str, Any]) -> str:
    init = cfg.get("init_from", "")
    if not init:
        return ""
    return (f" The run starts from the weights of `{init}` with a fresh optimizer, warmup "
            "and cosine; how those weights were trained is in the notes, and reproducing "
            "this run needs them.")


def _resume_note(facts: dict[str, Any]) -> str:
    """How resuming with a larger --steps changed the schedule (the cosine is recomputed)."""
    notes = []
    for before, after in zip(facts["starts"], facts["starts"][1:], strict=False):
        step = after["step"]
        old, new = (TrainConfig(**{**s["train_config"], "out_dir": "-"})
                    for s in (before, after))
        if old.steps != new.steps:
            notes.append(f"Resumed at step {step} with --steps {new.steps}: the cosine is "
                         f"recomputed over {new.steps} steps, so the learning rate steps from "
                         f"{lr_at(step - 1, old):.1e} to {lr_at(step, new):.1e} there. ")
    return "".join(notes)


def _results_lines(report: dict[str, Any], config: ModelConfig) -> list[str]:
    saved = report["compute_saved"]
    return [
        "## Results on the held-out test split", "",
        f"`loopserve eval` ({report['test_examples']} examples: up to 100 distinct problems "
        "per task and difficulty, every fact in its test-only phrasing, each in both "
        f"formats; greedy; adaptive semantics at threshold {report['threshold']}).",
        "", *target_rows(report), "", *accuracy_rows(report), "", *layer_rows(report), "",
        "Compute saved (1 - FLOPs / FLOPs at max depth, prompt + generated tokens, "
        f"engine/compute.py): {_pct(saved['all'])} overall; "
        + ", ".join(f"{k} {_pct(v)}" for k, v in saved.items() if k != "all")
        + f". Mean loops per token and layer: {report['mean_loops_per_token']:.2f} of "
        f"{config.max_loops}. Token agreement {_pct(report['token_agreement'])} (on problems "
        "exact semantics answers right: "
        f"{_pct(report['token_agreement_by_exact_answer']['exact_right'])}; wrong: "
        f"{_pct(report['token_agreement_by_exact_answer']['exact_wrong'])}); identical "
        f"greedy outputs in both semantics for {_pct(report['sequence_agreement'])} of the "
        "problems.",
        "", *sweep_rows(report), "", "![eval](eval.png)",
    ]


def _reproduce_lines(facts: dict[str, Any], config: ModelConfig) -> list[str]:
    run = facts["cfg"]["out_dir"]
    return [
        "## Reproduce", "", "```bash", *train_commands(facts),
        f"python -m training.card --run {run} --dest models/loopserve-tiny "
        f"--threshold {config.halt_threshold}",
        "loopserve eval                      # re-measure the shipped model (writes eval.json)",
        "```", "",
        "Training on another machine or thread count gives slightly different weights "
        "(floating-point reduction order); the data and the schedule are fixed by the seeds.",
    ]


def _fact_examples(corpus: Corpus) -> str:
    country = corpus.world.countries[0]
    facts = corpus.world.facts[country]
    names = {"capital": "capital", "currency": "currency", "river": "longest river"}
    return ", ".join(f"the {names[r]} of {country} is {a}" for r, a in facts.items())


def _mixture(cfg: dict[str, Any]) -> Mixture:
    mix = cfg.get("task_mix", "")  # runs older than --mix have no such field
    return Mixture.parse(mix) if mix else Mixture()


def _data_lines(corpus: Corpus) -> list[str]:
    mixture = corpus.mixture
    weights = ", ".join(f"{t} {w:.0%}" for t, w in mixture.task_weights)
    levels = ", ".join(f"{d}-digit {w:.0%}" for d, w in
                       zip(DIFFICULTIES["add"], mixture.difficulty_weights, strict=True))
    return [
        f"`training/data.py`, seeded, generated on the fly. Task mix: {weights}; difficulty "
        f"mix: {levels}; half chat, half plain completion. Train, validation and test never "
        "share a problem: arithmetic problems are assigned by a stable hash of the problem "
        "(a+b and b+a are one problem; 5% test, 5% validation); for facts the question is "
        "held out: each fact has ten phrasings, one test-only, one validation-only, eight "
        "for training, so test fact recall asks every fact in a phrasing it was never trained "
        f"on for that fact.{_extra_note(corpus)}",
    ]


def _extra_note(corpus: Corpus) -> str:
    if not corpus.extra_phrasings:
        return ""
    return (f" Training also asks each fact in {len(EXTRA_FRAMES)} training-only frames "
            "(`data.EXTRA_FRAMES`: the country early, late or in the middle). None is one of "
            "the ten, so the held-out phrasing is still never seen for that fact, but a few are "
            "close to some of the ten (\"Say the capital of X.\" beside \"Give the capital of "
            "X.\"): for some facts the held-out question has a near cousin in training.")


def _semantics_lines(cfg: dict[str, Any], compare: dict[str, dict[str, Any]]) -> list[str]:
    lines = [f"**Training semantics: {cfg['semantics']}** (exact: every token runs all loop "
             "steps; adaptive: tokens halt at the threshold and later steps see their last "
             "k/v, as served; mixed: the two alternate step by step; consistent: both on "
             "every batch, plus a KL term pulling the adaptive prediction to the exact one, "
             f"weight {cfg.get('consistency_weight', 1.0):g})."]
    if not compare:
        return lines
    best_ce = min(compare, key=lambda n: compare[n]["answer_cross_entropy"]["adaptive"])
    best_agree = max(compare, key=lambda n: compare[n]["token_agreement"])
    return lines + [
        "",
        "Measured with three short runs (500 steps, batch 32, one per semantics; the corpus "
        "version is in the notes), evaluated on the validation split (`loopserve eval "
        "--split val --per-cell 20`):",
        "", *comparison_rows(compare), "",
        f"Lowest served answer cross-entropy: {best_ce}; best agreement between the two "
        f"semantics: {best_agree}.",
    ]


def kept_notes(page: Path) -> list[str]:
    """The hand-written part of a generated page (from NOTES_MARKER on), kept on rewrite."""
    text = page.read_text() if page.is_file() else ""
    _, marker, notes = text.partition(NOTES_MARKER)
    return [NOTES_MARKER + notes.rstrip("\n")] if marker else [NOTES_MARKER]


# ---------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.card", description=__doc__.split(
        "\n")[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--dest", required=True, type=Path)
    p.add_argument("--threshold", type=float, default=None, help="default halt_threshold")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=EVAL_JSON",
                   help="eval.json of a run trained in another semantics")
    p.add_argument("--skip-eval", action="store_true", help="reuse dest/eval.json")
    args = p.parse_args(argv)
    config = ship(args.run, args.dest, args.threshold)
    if not args.skip_eval:
        evaluate.main(["eval", "--model", str(args.dest)])
    report = json.loads((args.dest / "eval.json").read_text())
    records = read_log(args.run)
    plot_training(records, args.dest / "training.png")
    compare = {}
    for item in args.compare:
        name, _, path = item.partition("=")
        compare[name] = json.loads(Path(path).read_text())
    write_card(args.dest, config, report, records, compare)
    print(f"wrote {args.dest / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
