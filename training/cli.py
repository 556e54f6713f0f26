"""`loopserve train`: train a looped model on the synthetic corpus (see training/train.py).

    loopserve train --out runs/loopserve-tiny            # the bundled model's recipe
    loopserve train --out runs/x --steps 20 --model tiny # a smoke run
    loopserve train --out runs/loopserve-tiny --resume   # continue from the last checkpoint
    loopserve train --out runs/more --init-from models/loopserve-tiny \
        --mix add=0.35,sub=0.15,mul=0.15,expr=0.05,fact=0.3  # train a shipped model further
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.config import ModelConfig
from model.errors import ConfigError
from model.presets import get_preset
from training.train import BUNDLED_CONFIG, SEMANTICS, STATE_FILE, TrainConfig, train

DEFAULTS = TrainConfig()


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a looped transformer with memory "
                                "on the synthetic arithmetic + facts corpus.")
    p.add_argument("--out", default=DEFAULTS.out_dir, help="run directory (checkpoints, log)")
    p.add_argument("--model", default="bundled",
                   help="model config: 'bundled' (default), an engine preset name such as "
                        "'tiny', or a path to a config.json")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a model config field, e.g. --set halt_threshold=0.2")
    p.add_argument("--steps", type=int, default=DEFAULTS.steps)
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--lr", type=float, default=DEFAULTS.lr)
    p.add_argument("--warmup-steps", type=int, default=DEFAULTS.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=DEFAULTS.weight_decay)
    p.add_argument("--semantics", choices=SEMANTICS, default=DEFAULTS.semantics,
                   help="exact: all tokens run N loop steps; adaptive: tokens halt at the "
                        "threshold as in serving; mixed: the two on alternate steps; "
                        "consistent: both on every batch, plus --consistency-weight * "
                        "KL(exact || adaptive) on the answers (twice the step cost)")
    p.add_argument("--consistency-weight", type=float, default=DEFAULTS.consistency_weight,
                   help="weight of the KL term of --semantics consistent")
    p.add_argument("--threshold", type=float, default=None,
                   help="halting threshold of adaptive training (default: the model's)")
    p.add_argument("--ponder-weight", type=float, default=DEFAULTS.ponder_weight)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--data-seed", type=int, default=DEFAULTS.data_seed)
    p.add_argument("--log-every", type=int, default=DEFAULTS.log_every)
    p.add_argument("--eval-every", type=int, default=DEFAULTS.eval_every)
    p.add_argument("--val-per-cell", type=int, default=DEFAULTS.val_per_cell)
    p.add_argument("--threads", type=int, default=DEFAULTS.threads)
    p.add_argument("--mix", default=DEFAULTS.task_mix, metavar="TASK=WEIGHT,...",
                   help="training task weights, every task once, e.g. "
                        "add=0.35,sub=0.2,mul=0.15,expr=0.05,fact=0.25 (default: data.Mixture)")
    p.add_argument("--init-from", default=DEFAULTS.init_from, metavar="MODEL_DIR",
                   help="start from this checkpoint's weights (fresh optimizer and schedule); "
                        "its config.json is the model config unless --model names another "
                        "(a resumed run keeps its own; --mix likewise)")
    p.add_argument("--extra-phrasings", action="store_true",
                   help="also ask the facts in 20 training-only question frames per relation "
                        "(the held-out phrasings stay unseen; a resumed run keeps its own)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue from {STATE_FILE} in --out if it exists")
    return p


def model_config(name: str, overrides: list[str]) -> ModelConfig:
    """The named config (bundled / preset / config.json path) with FIELD=VALUE overrides."""
    if name == "bundled":
        cfg = BUNDLED_CONFIG
    elif Path(name).is_file():
        cfg = ModelConfig.load(name)
    else:
        cfg = get_preset(name)
    changes = {}
    for item in overrides:
        field, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        changes[field] = json.loads(value)
    return cfg.replace(**changes) if changes else cfg


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        out_dir=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=min(args.warmup_steps, args.steps), weight_decay=args.weight_decay,
        seed=args.seed, data_seed=args.data_seed, semantics=args.semantics,
        train_threshold=args.threshold, ponder_weight=args.ponder_weight,
        log_every=args.log_every, eval_every=args.eval_every, val_per_cell=args.val_per_cell,
        threads=args.threads, task_mix=args.mix, init_from=args.init_from,
        extra_phrasings=args.extra_phrasings, consistency_weight=args.consistency_weight)


def main(argv: list[str]) -> int:
    args = build_parser(f"loopserve {argv[0]}").parse_args(argv[1:])
    resuming = args.resume and (Path(args.out) / STATE_FILE).is_file()
    if (args.init_from and not resuming
            and not (Path(args.init_from) / "model.safetensors").is_file()):
        print(f"loopserve train: --init-from {args.init_from}: no model.safetensors there "
              "(give a checkpoint directory such as models/loopserve-tiny)", file=sys.stderr)
        return 2
    try:
        cfg = train_config(args)
        # a resumed run keeps the model config it started with
        name = str(Path(args.out) / "config.json") if resuming else args.model
        if not resuming and args.init_from and args.model == "bundled":
            name = str(Path(args.init_from) / "config.json")
        model_cfg = model_config(name, [] if resuming else args.set)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        print(f"loopserve train: {exc}", file=sys.stderr)
        return 2
    try:
        state = train(model_cfg, cfg, resume=args.resume)
    except ConfigError as exc:  # weights that do not fit, a resume that changes the mix
        print(f"loopserve train: {exc}", file=sys.stderr)
        return 2
    print(f"trained {state.step} steps in {state.elapsed_s / 60:.1f} min; model in {args.out}")
    return 0
