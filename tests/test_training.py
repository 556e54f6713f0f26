"""Training loop, resume, greedy decoding and the eval report, on a tiny model (fast, CPU)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from engine import ModelConfig, load_model
from training.batching import IGNORE, collate, teacher_forced
from training.data import Corpus, Mixture
from training.decode import greedy_decode
from training.evaluate import evaluate
from training.train import TrainConfig, lr_at, train

TINY = ModelConfig(loop_scale_init=0.0)


def quick(tmp_path, **changes) -> TrainConfig:
    base = TrainConfig(out_dir=str(tmp_path), steps=20, batch_size=16, warmup_steps=5,
                       log_every=5, eval_every=20, val_per_cell=2, threads=1)
    return dataclasses.replace(base, **changes)


def train_losses(path) -> list[float]:
    events = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if e["event"] == "train"]


def test_twenty_steps_lower_the_loss_and_leave_a_loadable_model(tmp_path):
    train(TINY, quick(tmp_path))
    losses = train_losses(tmp_path)
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.5
    model = load_model(tmp_path)
    assert model.config == TINY
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["type"] == "byte"


def test_resume_continues_exactly(tmp_path):
    straight = train(TINY, quick(tmp_path / "a", steps=12, eval_every=6, semantics="mixed"))
    train(TINY, quick(tmp_path / "b", steps=6, eval_every=6, semantics="mixed"))
    resumed = train(TINY, quick(tmp_path / "b", steps=12, eval_every=6, semantics="mixed"),
                    resume=True)
    assert resumed.step == 12
    for (name, a), b in zip(straight.model.state_dict().items(),
                            resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) < lr_at(20, cfg)
    assert lr_at(100, cfg) == pytest.approx(1e-4)


def test_bad_train_config_names_the_field():
    with pytest.raises(ValueError, match="semantics must be one of"):
        TrainConfig(semantics="sometimes")


def test_collate_scores_only_the_answer():
    example = Corpus(0).held_out("test", 1)[0]
    batch = collate([example], pad_id=256)
    scored = (batch.targets[0] != IGNORE).nonzero().flatten().tolist()
    assert scored[0] == example.prompt_len - 1
    assert batch.targets[0, scored].tolist() == example.answer_ids


def test_batched_greedy_decode_matches_one_by_one_and_teacher_forcing():
    torch.manual_seed(0)
    from engine import LoopLM
    model = LoopLM(TINY).eval()
    examples = Corpus(0).held_out("test", 1)[:12]
    prompts = [e.prompt for e in examples]
    batched = greedy_decode(model, prompts, halt_threshold=0.3, max_new_tokens=5)
    single = [greedy_decode(model, [p], halt_threshold=0.3, max_new_tokens=5)[0]
              for p in prompts]
    assert batched == single
    # greedy exact match == teacher-forced exact match (make the answers the greedy output)
    forced = [dataclasses.replace(e, ids=(*e.prompt, *g)) for e, g in zip(examples, batched,
                                                                         strict=True)]
    assert teacher_forced(model, forced, 0.3).correct.all()


def test_eval_report_has_every_number(tmp_path):
    torch.manual_seed(0)
    from engine import LoopLM
    from training.plots import plot_eval
    model = LoopLM(TINY).eval()
    examples = Corpus(0).held_out("test", 1)[::40]
    report = evaluate(model, examples, threshold=0.3, max_new_tokens=3, sweep=(0.0, 0.3))
    for key in ("accuracy", "token_agreement", "loops_per_layer", "answer_loops_by_difficulty",
                "memory_gate_per_layer", "compute_saved", "targets", "threshold_sweep"):
        assert key in report
    assert 0.0 <= report["token_agreement"] <= 1.0
    assert report["threshold_sweep"][0]["compute_saved"] == 0.0  # eps 0: every step runs
    assert len(report["loops_per_layer"]) == TINY.n_layers
    report.update(model="tiny", split="test")
    plot_eval(report, tmp_path / "eval.png")
    assert (tmp_path / "eval.png").stat().st_size > 1000


def test_init_from_starts_at_the_checkpoint_weights(tmp_path):
    first = train(TINY, quick(tmp_path / "a", steps=4, warmup_steps=2, eval_every=4))
    init = quick(tmp_path / "b", steps=1, warmup_steps=0, lr=0.0, init_from=str(tmp_path / "a"))
    started = train(TINY, init)  # lr 0: the one step changes nothing, weights are a's
    for (name, a), b in zip(first.model.state_dict().items(),
                            started.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # a resume keeps the origin and the mix without naming them, and no longer needs the
    # init directory; naming another mix is an error
    mix = "add=1,sub=1,mul=1,expr=1,fact=1"
    train(TINY, quick(tmp_path / "d", steps=2, warmup_steps=1, eval_every=2, task_mix=mix,
                      init_from=str(tmp_path / "a")))
    shutil.move(tmp_path / "a", tmp_path / "moved")
    resumed = train(TINY, quick(tmp_path / "d", steps=4, warmup_steps=1, eval_every=2),
                    resume=True)
    assert resumed.step == 4
    starts = [json.loads(line) for line in (tmp_path / "d" / "log.jsonl").read_text()
              .splitlines() if '"start"' in line]
    assert starts[-1]["train_config"]["task_mix"] == mix
    assert starts[-1]["train_config"]["init_from"] == str(tmp_path / "a")
    with pytest.raises(ValueError, match="a resumed run keeps its --extra-phrasings"):
        train(TINY, quick(tmp_path / "d", steps=6, extra_phrasings=True), resume=True)
    with pytest.raises(ValueError, match="a resumed run keeps its --mix"):
        train(TINY, quick(tmp_path / "d", steps=6, warmup_steps=1, task_mix="add=1,sub=0,"
                          "mul=0,expr=0,fact=1"), resume=True)
    wrong = TINY.replace(d_model=32, head_dim=8)
    with pytest.raises(ValueError, match="do not fit the model config"):
        train(wrong, quick(tmp_path / "c", steps=1, warmup_steps=0,
                           init_from=str(tmp_path / "moved")))


def test_task_mix_is_validated_and_drives_the_draws():
    cfg = TrainConfig(task_mix="add=1,sub=0,mul=0,expr=0,fact=1")
    mixture = cfg.mixture()
    assert dict(mixture.task_weights) == {"add": 0.5, "sub": 0.0, "mul": 0.0, "expr": 0.0,
                                          "fact": 0.5}
    assert Mixture.parse(mixture.describe()) == mixture
    import random
    corpus = Corpus(0, mixture=mixture)
    rng = random.Random(0)
    tasks = {corpus.sample("train", rng).problem.task for _ in range(200)}
    assert tasks == {"add", "fact"}
    for bad, says in (("add=1", "names every task"), ("add=x,sub=0,mul=0,expr=0,fact=0",
                                                       "must be a number"),
                      ("add=1,add=2", "each of"), ("add=-1,sub=0,mul=0,expr=0,fact=1", ">= 0"),
                      ("add=inf,sub=0,mul=0,expr=0,fact=1", "finite"),
                      ("add=0,sub=0,mul=0,expr=0,fact=0", "more than 0")):
        with pytest.raises(ValueError, match=says):
            TrainConfig(task_mix=bad)


def test_cli_rejects_a_missing_init_checkpoint(tmp_path, capsys):
    from training.cli import main
    assert main(["train", "--out", str(tmp_path), "--init-from", str(tmp_path / "none")]) == 2
    assert "no model.safetensors there" in capsys.readouterr().err


def test_card_says_where_the_weights_started_and_the_mix(tmp_path):
    from engine import LoopLM
    from training.card import read_log, ship, train_commands, training_facts, write_card
    train(TINY, quick(tmp_path / "a", steps=2, warmup_steps=1, eval_every=2))
    mix = "add=0.5,sub=0.2,mul=0.1,expr=0.1,fact=0.1"
    train(TINY, quick(tmp_path / "b", steps=2, warmup_steps=1, eval_every=2, task_mix=mix,
                      lr=1e-3, init_from=str(tmp_path / "a"), extra_phrasings=True))
    records = read_log(tmp_path / "b")
    command = train_commands(training_facts(records))[0]
    assert f"--init-from {tmp_path / 'a'}" in command and f"--mix {mix}" in command
    assert "--extra-phrasings" in command and "--extra-phrasings True" not in command
    assert "--lr 0.001" in command and "--batch-size 16" in command
    dest = tmp_path / "card"
    config = ship(tmp_path / "b", dest, threshold=0.3)
    torch.manual_seed(0)
    report = evaluate(LoopLM(TINY).eval(), Corpus(0).held_out("test", 1)[::40], threshold=0.3,
                      max_new_tokens=3, sweep=(0.0, 0.3))
    report.update(model=str(dest), split="test")
    write_card(dest, config, report, records, compare={})
    card = (dest / "README.md").read_text()
    assert f"starting from the weights of `{tmp_path / 'a'}`" in card
    assert "Task mix: add 50%, sub 20%, mul 10%, expr 10%, fact 10%" in card
    assert "20 training-only frames" in card
    assert "| 2-digit addition, exact match | >= 95.0% |" in card
    assert "better than the previous 3.3%" in card


def test_consistent_semantics_runs_both_and_pulls_adaptive_to_exact(tmp_path):
    from training.train import consistent_loss, new_state, train_threshold
    cfg = quick(tmp_path / "c", steps=2, warmup_steps=1, eval_every=2, semantics="consistent")
    state = train(TINY, cfg)
    assert state.step == 2
    record = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text()
              .splitlines() if '"train"' in line][-1]
    assert record["kl"] >= 0 and "ce_exact" in record
    assert train_threshold(cfg, TINY, 0) == TINY.halt_threshold  # adaptive on every step
    fresh = new_state(TINY, cfg)
    batch = collate(Corpus(0).held_out("val", 1)[:8], TINY.pad_token_id)
    loss0, stats0 = consistent_loss(fresh.model, batch, 0.3,
                                    dataclasses.replace(cfg, consistency_weight=0.0))
    loss1, stats1 = consistent_loss(fresh.model, batch, 0.3, cfg)
    assert stats1["kl"] > 0  # the semantics differ at threshold 0.3
    assert float((loss1 - loss0).detach()) == pytest.approx(stats1["kl"], rel=1e-3, abs=1e-6)
    assert stats0["kl"] == stats1["kl"]  # the weight scales the term, not the divergence
    with pytest.raises(ValueError, match="consistency_weight"):
        TrainConfig(consistency_weight=-1.0)
