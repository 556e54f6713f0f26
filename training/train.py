"""The training loop behind the bundled checkpoint: AdamW, warmup + cosine, ponder penalty.

One step: draw a batch from the seeded corpus, run the model in the chosen *training
semantics* (exact: every token runs all N loop steps, the ACT mixture of DESIGN section 2;
adaptive: tokens halt at the threshold and later steps see their last k/v, exactly as the
server runs them; mixed: alternate the two step by step), score the answer tokens, add
`ponder_weight` times the normalised expected number of loop steps of every real token,
and step.

The run directory holds, after every checkpoint, a loadable model (config.json,
model.safetensors, tokenizer_config.json), `training_state.pt` (optimizer, step, data RNG:
what `--resume` needs) and `log.jsonl` (one JSON object per log line).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.errors import ConfigError
from model.looplm import LoopLM
from model.tokenizer import BYTE_SPECIALS
from model.weights import load_model, save_model
from training.batching import IGNORE, Batch, chunks, collate, teacher_forced
from training.data import Corpus, Example, Mixture

STATE_FILE = "training_state.pt"
LOG_FILE = "log.jsonl"
SEMANTICS = ("exact", "adaptive", "mixed", "consistent")
BUCKETS = 8  # batches drawn at once and grouped by length

# The bundled model: ~1M parameters (about 4 MB in fp32), 4 layers that loop up to 3 times.
BUNDLED_CONFIG = ModelConfig(
    d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, ffn_hidden=384,
    max_loops=3, local_memory_slots=32, global_memory_slots=64, max_position=256,
    loop_scale_init=0.0, halt_threshold=0.1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that fixes a training run besides the model config."""

    out_dir: str = "runs/loopserve-tiny"
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    data_seed: int = 0
    semantics: str = "adaptive"
    train_threshold: float | None = None  # None: the model config's halt_threshold
    ponder_weight: float = 0.01
    log_every: int = 25
    eval_every: int = 250
    val_per_cell: int = 16
    threads: int = 2
    task_mix: str = ""  # "add=0.35,sub=0.2,...": training task weights ("" = data.Mixture())
    init_from: str = ""  # a model directory whose weights start the run ("" = random init)
    extra_phrasings: bool = False  # facts also asked in data.EXTRA_QUESTIONS (train only)
    consistency_weight: float = 1.0  # `consistent` semantics: weight of KL(exact || adaptive)

    def mixture(self) -> Mixture:
        return Mixture.parse(self.task_mix) if self.task_mix else Mixture()

    def __post_init__(self) -> None:
        self.mixture()  # a bad mix fails here, naming what is allowed
        if self.semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {self.semantics!r}")
        for name in ("steps", "batch_size", "log_every", "eval_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got "
                             f"{self.warmup_steps}")
        if not (self.consistency_weight >= 0 and math.isfinite(self.consistency_weight)):
            raise ValueError(f"consistency_weight must be a finite number >= 0, got "
                             f"{self.consistency_weight}")
        if self.train_threshold is not None and not 0 <= self.train_threshold < 1:
            raise ValueError(f"train_threshold must be in [0, 1), got {self.train_threshold}")


@dataclasses.dataclass
class TrainState:
    model: LoopLM
    optimizer: torch.optim.Optimizer
    data_rng: random.Random
    step: int = 0
    elapsed_s: float = 0.0  # wall time spent training, summed over resumed sessions
    pending: list[list[Example]] = dataclasses.field(default_factory=list)  # drawn batches


# ---------------------------------------------------------------------- set-up
def build_optimizer(model: LoopLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases, loop scales)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_threshold(cfg: TrainConfig, model_cfg: ModelConfig, step: int) -> float | None:
    """The halting threshold of this step's forward (None = exact semantics); `mixed`
    alternates exact and adaptive steps so that the model serves well in both."""
    if cfg.semantics == "exact" or (cfg.semantics == "mixed" and step % 2 == 0):
        return None
    return model_cfg.halt_threshold if cfg.train_threshold is None else cfg.train_threshold


def consistent_loss(model: LoopLM, batch: Batch, threshold: float, cfg: TrainConfig
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Both semantics on the same batch: the mean of their losses, plus
    consistency_weight * KL(exact || adaptive) on the answer tokens, with the exact
    distribution as the fixed target. What it buys is agreement: the served (adaptive)
    model predicting what running every loop would (DESIGN: the token agreement)."""
    exact_loss, exact_stats, logits_exact = compute_loss(model, batch, None, cfg.ponder_weight)
    loss, stats, logits = compute_loss(model, batch, threshold, cfg.ponder_weight)
    scored = batch.targets != IGNORE
    kl = F.kl_div(F.log_softmax(logits[scored], -1),
                  F.log_softmax(logits_exact[scored].detach(), -1),
                  log_target=True, reduction="batchmean")
    stats.update(kl=kl.item(), ce_exact=exact_stats["ce"])
    return (exact_loss + loss) / 2 + cfg.consistency_weight * kl, stats


def new_state(model_cfg: ModelConfig, cfg: TrainConfig, init: bool = True) -> TrainState:
    """A fresh run: seeded init (or cfg.init_from's weights when `init`), new optimizer."""
    torch.manual_seed(cfg.seed)
    model = LoopLM(model_cfg)
    if init and cfg.init_from:
        _load_initial_weights(model, cfg.init_from)
    return TrainState(model, build_optimizer(model, cfg), random.Random(f"train:{cfg.seed}"))


def _load_initial_weights(model: LoopLM, directory: str) -> None:
    """Start from a trained checkpoint (same shapes; non-shape config fields may differ)."""
    source = load_model(directory)
    try:
        model.load_state_dict(source.state_dict())
    except RuntimeError as exc:
        raise ConfigError(f"--init-from {directory}: its weights do not fit the model config "
                         f"({str(exc).splitlines()[-1].strip()})") from None


# ---------------------------------------------------------------------- one step
def compute_loss(model: LoopLM, batch: Batch, threshold: float | None, ponder_weight: float
                 ) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    """Answer cross-entropy + ponder_weight * (mean expected steps of real tokens - 1)/(N-1);
    returns the loss, its statistics and the logits [B, T, V]."""
    out = model(batch.ids, halt_threshold=threshold)
    ce = F.cross_entropy(out.logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
    n = model.config.max_loops
    steps = out.expected_steps[batch.real]  # [tokens, L]
    ponder = (steps.mean() - 1) / (n - 1) if n > 1 else steps.mean() * 0
    scored = batch.targets != IGNORE
    token_acc = (out.logits.argmax(-1) == batch.targets)[scored].float().mean()
    stats = {"ce": ce.item(), "ponder": ponder.item(), "token_acc": token_acc.item(),
             "expected_steps": steps.mean(0).tolist(),
             "gate_local": out.memory_gates[batch.real][:, :, 0].mean(0).tolist(),
             "gate_global": out.memory_gates[batch.real][:, :, 1].mean(0).tolist()}
    return ce + ponder_weight * ponder, stats, out.logits


def next_batch(state: TrainState, corpus: Corpus, cfg: TrainConfig) -> list[Example]:
    """Batches of similar length (little padding): draw BUCKETS batches' worth of examples,
    sort them by length, cut, and serve the batches in a random order."""
    if not state.pending:
        drawn = [corpus.sample("train", state.data_rng) for _ in range(BUCKETS * cfg.batch_size)]
        drawn.sort(key=lambda e: len(e.ids))
        state.pending = [drawn[i:i + cfg.batch_size] for i in range(0, len(drawn),
                                                                    cfg.batch_size)]
        state.data_rng.shuffle(state.pending)
    return state.pending.pop()


def train_step(state: TrainState, corpus: Corpus, cfg: TrainConfig) -> dict[str, Any]:
    """One optimizer step on a fresh training batch; returns its statistics."""
    model, opt = state.model, state.optimizer
    model.train()
    lr = lr_at(state.step, cfg)
    for group in opt.param_groups:
        group["lr"] = lr
    batch = collate(next_batch(state, corpus, cfg), model.config.pad_token_id)
    threshold = train_threshold(cfg, model.config, state.step)
    if cfg.semantics == "consistent":
        loss, stats = consistent_loss(model, batch, threshold, cfg)
    else:
        loss, stats, _ = compute_loss(model, batch, threshold, cfg.ponder_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    state.step += 1
    return {"step": state.step, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
            **stats}


# ---------------------------------------------------------------------- validation
@torch.no_grad()
def validate(model: LoopLM, examples: list[Example], batch_size: int = 128) -> dict[str, Any]:
    """Teacher-forced exact match per task in both semantics, loops and gates per layer."""
    model.eval()
    threshold = model.config.halt_threshold
    result: dict[str, Any] = {}
    for name, eps in (("exact", None), ("adaptive", threshold)):
        correct, depth_sum, gate_sum, tokens = [], 0.0, 0.0, 0
        for part in chunks(examples, batch_size):
            tf = teacher_forced(model, part, eps)
            correct += tf.correct.tolist()
            real = tf.batch.real
            depth_sum = depth_sum + tf.depths[real].float().sum(0)
            gate_sum = gate_sum + tf.gates[real].sum(0)
            tokens += int(real.sum())
        result[f"{name}_acc"] = _accuracy_by_task(examples, correct)
        if name == "adaptive":
            result["loops_per_layer"] = (depth_sum / tokens).tolist()
            result["gate_per_layer"] = (gate_sum / tokens).tolist()  # [L, 2] local, global
    return result


def _accuracy_by_task(examples: list[Example], correct: list[bool]) -> dict[str, float]:
    totals: dict[str, list[int]] = {}
    for example, ok in zip(examples, correct, strict=True):
        key = example.problem.task
        if key in ("add", "sub", "mul"):
            key = f"{key}{example.problem.difficulty}"
        totals.setdefault(key, [0, 0])
        totals[key][0] += int(ok)
        totals[key][1] += 1
    return {k: round(v[0] / v[1], 4) for k, v in sorted(totals.items())}


# ---------------------------------------------------------------------- checkpoints
def write_tokenizer_config(directory: Path, model_cfg: ModelConfig) -> None:
    """Describe the byte tokenizer and the chat template (engine/tokenizer.py implements it)."""
    description = {
        "tokenizer_class": "ByteTokenizer",
        "type": "byte",
        "vocab_size": model_cfg.vocab_size,
        "byte_ids": "0..255 are the UTF-8 bytes themselves",
        "special_tokens": BYTE_SPECIALS,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "role_markers": {"system": "<|system|>", "user": "<|user|>",
                         "assistant": "<|assistant|>"},
        "chat_template": "<bos>{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<eos>"
                         "{% endfor %}<|assistant|>",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(description, indent=2) + "\n")


def save_checkpoint(state: TrainState, cfg: TrainConfig) -> None:
    """A loadable model plus everything `resume` needs, written atomically."""
    out = Path(cfg.out_dir)
    save_model(state.model, out)
    write_tokenizer_config(out, state.model.config)
    payload = {"optimizer": state.optimizer.state_dict(), "step": state.step,
               "elapsed_s": state.elapsed_s, "data_rng": state.data_rng.getstate(),
               "pending": state.pending,
               "model": state.model.state_dict(), "train_config": dataclasses.asdict(cfg)}
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out / STATE_FILE)


def resumed_config(cfg: TrainConfig, saved: dict[str, Any]) -> TrainConfig:
    """A resumed run keeps the task mix and the origin it started with; naming others is an
    error (leaving them out inherits them)."""
    changes = {}
    for name, flag in (("task_mix", "--mix"), ("init_from", "--init-from"),
                       ("extra_phrasings", "--extra-phrasings")):
        old, new = saved.get(name, type(getattr(cfg, name))()), getattr(cfg, name)
        if new and new != old:
            raise ConfigError(f"a resumed run keeps its {flag}: it started with "
                              f"{old or '(none)'}, got {new}")
        changes[name] = old
    return dataclasses.replace(cfg, **changes)


def resume_state(model_cfg: ModelConfig, cfg: TrainConfig, payload: dict[str, Any]
                 ) -> TrainState:
    """Rebuild a saved state (model, optimizer, step, data RNG) from its payload."""
    state = new_state(model_cfg, cfg, init=False)
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.data_rng.setstate(payload["data_rng"])
    state.pending = payload["pending"]
    state.step, state.elapsed_s = payload["step"], payload["elapsed_s"]
    return state


# ---------------------------------------------------------------------- the loop
def train(model_cfg: ModelConfig, cfg: TrainConfig, resume: bool = False) -> TrainState:
    """Run (or continue) training to cfg.steps; checkpoints at every validation."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    can_resume = resume and (out / STATE_FILE).is_file()
    if can_resume:
        payload = torch.load(out / STATE_FILE, weights_only=False)
        cfg = resumed_config(cfg, payload["train_config"])
        state = resume_state(model_cfg, cfg, payload)
    else:
        state = new_state(model_cfg, cfg)
    corpus = Corpus(cfg.data_seed, mixture=cfg.mixture(), extra_phrasings=cfg.extra_phrasings)
    val_set = corpus.held_out("val", cfg.val_per_cell)
    logger = RunLogger(out / LOG_FILE, cfg.steps, cfg.log_every, fresh=not can_resume)
    logger.event({"event": "start", "step": state.step, "train_config": dataclasses.asdict(cfg),
                  "model_config": model_cfg.to_dict(), "val_examples": len(val_set)})
    while state.step < cfg.steps:
        started = time.perf_counter()
        stats = train_step(state, corpus, cfg)
        state.elapsed_s += time.perf_counter() - started
        logger.progress(stats, state.elapsed_s)
        if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            _validate_and_save(state, cfg, val_set, logger)
    return state


def _validate_and_save(state: TrainState, cfg: TrainConfig, val_set: list[Example],
                       logger: RunLogger) -> None:
    started = time.perf_counter()
    result = validate(state.model, val_set)
    save_checkpoint(state, cfg)
    logger.event({"event": "val", "step": state.step, "elapsed_s": round(state.elapsed_s, 1),
                  "val_s": round(time.perf_counter() - started, 1), **result})


class RunLogger:
    """JSON lines to a file; a progress line on stderr (redrawn on a terminal)."""

    def __init__(self, path: Path, total_steps: int, log_every: int, fresh: bool) -> None:
        self.path, self.total, self.log_every = path, total_steps, log_every
        if fresh:
            path.write_text("")
        self.tty = sys.stderr.isatty()
        self.window: list[dict[str, Any]] = []

    def event(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("event") == "val":
            print(f"\n{_format_val(record)}", file=sys.stderr, flush=True)

    def progress(self, stats: dict[str, Any], elapsed_s: float) -> None:
        """Redraw the bar every step on a terminal, print a line per window otherwise."""
        self.window.append(stats)
        boundary = stats["step"] % self.log_every == 0 or stats["step"] == self.total
        if self.tty or boundary:
            line = _progress_line(self.window, self.total, elapsed_s)
            print(("\r" if self.tty else "") + line, end="" if self.tty else "\n",
                  file=sys.stderr, flush=True)
        if boundary:
            self.event({"event": "train", "elapsed_s": round(elapsed_s, 1),
                        **_mean_stats(self.window)})
            self.window = []


def _mean_stats(window: list[dict[str, Any]]) -> dict[str, Any]:
    """Average the numbers (and lists of numbers) of a window of step statistics."""
    merged: dict[str, Any] = {"step": window[-1]["step"], "lr": window[-1]["lr"]}
    for key in ("loss", "ce", "ponder", "token_acc", "grad_norm", "kl", "ce_exact"):
        if key in window[-1]:  # the last two: `consistent` semantics only
            merged[key] = round(sum(s[key] for s in window) / len(window), 4)
    for key in ("expected_steps", "gate_local", "gate_global"):
        columns = zip(*(s[key] for s in window), strict=True)
        merged[key] = [round(sum(c) / len(window), 3) for c in columns]
    return merged


def _progress_line(window: list[dict[str, Any]], total: int, elapsed_s: float) -> str:
    step = window[-1]["step"]
    done = step / total
    bar = "#" * int(done * 20)
    rate = step / max(elapsed_s, 1e-9)
    eta = (total - step) / max(rate, 1e-9)
    loss = sum(s["loss"] for s in window) / len(window)
    steps = window[-1]["expected_steps"]
    return (f"[{bar:<20}] {step}/{total} loss {loss:.4f} lr {window[-1]['lr']:.2e} "
            f"E[loops] {' '.join(f'{x:.2f}' for x in steps)} {rate:.2f} it/s "
            f"elapsed {elapsed_s / 60:.1f}m eta {eta / 60:.1f}m")


def _format_val(record: dict[str, Any]) -> str:
    def accs(d: dict[str, float]) -> str:
        return " ".join(f"{k}={v:.2f}" for k, v in d.items())
    loops = " ".join(f"{x:.2f}" for x in record["loops_per_layer"])
    return (f"val step {record['step']}: exact [{accs(record['exact_acc'])}]\n"
            f"    adaptive [{accs(record['adaptive_acc'])}] loops/layer {loops}")
