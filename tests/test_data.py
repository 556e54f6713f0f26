"""The synthetic corpus: deterministic, correct answers, and splits that never share a problem."""

from __future__ import annotations

import random

import pytest

from engine import ByteTokenizer
from training.data import (
    DIFFICULTIES,
    EXTRA_QUESTIONS,
    FACT_QUESTIONS,
    RELATION_NOUNS,
    Corpus,
    arithmetic_problem,
    canonical_key,
    eval_expression,
    render,
    split_of_key,
)


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus(seed=0)


def test_same_seed_same_corpus():
    a, b = Corpus(seed=3), Corpus(seed=3)
    assert a.world == b.world
    draws_a = [a.sample("train", random.Random(7)).ids for _ in range(50)]
    draws_b = [b.sample("train", random.Random(7)).ids for _ in range(50)]
    assert draws_a == draws_b
    assert [e.ids for e in a.held_out("test", 5)] == [e.ids for e in b.held_out("test", 5)]
    assert Corpus(seed=4).world != a.world


def test_split_of_key_is_stable_and_about_five_percent():
    keys = [f"{a}+{b}" for a in range(100) for b in range(a, 100)]
    splits = [split_of_key(k, 0) for k in keys]
    assert splits == [split_of_key(k, 0) for k in keys]
    assert 0.03 < splits.count("test") / len(keys) < 0.07
    assert 0.03 < splits.count("val") / len(keys) < 0.07


def test_splits_never_share_a_problem(corpus):
    rng = random.Random(0)
    train_keys = {corpus.sample("train", rng).problem.key for _ in range(3000)}
    val_keys = {e.problem.key for e in corpus.held_out("val", 30)}
    test_keys = {e.problem.key for e in corpus.held_out("test", 30)}
    assert not train_keys & val_keys
    assert not train_keys & test_keys
    assert not val_keys & test_keys


def test_commuted_problems_are_one_problem():
    assert canonical_key("add", 12, 345) == canonical_key("add", 345, 12)
    assert canonical_key("mul", 7, 345) == canonical_key("mul", 345, 7)
    assert canonical_key("sub", 12, 345) != canonical_key("sub", 345, 12)
    rng = random.Random(1)
    for _ in range(50):
        p = arithmetic_problem("add", 3, rng)
        a, _, b = p.operands
        assert p.key == canonical_key("add", int(b), int(a))


def test_every_fact_is_trained_and_tested_in_different_phrasings(corpus):
    for phrasings in corpus._fact_splits.values():
        splits = sorted(phrasings.values())
        assert splits.count("test") == 1 and splits.count("val") == 1
        assert splits.count("train") == len(FACT_QUESTIONS["capital"]) - 2


def test_extra_phrasings_are_training_only_and_leave_held_out_sets_alone():
    extended = Corpus(0, extra_phrasings=True)
    for split in ("test", "val"):
        assert extended.held_out(split, 3) == Corpus(0).held_out(split, 3)
    rng = random.Random(3)
    facts = [extended.draw_problem("train", "fact", 1, rng) for _ in range(400)]
    extra = [p for p in facts if p.phrasing >= len(FACT_QUESTIONS[p.relation])]
    assert len(extra) > 200  # 20 of the 28 training phrasings
    assert all(extended.split_of(p) == "train" for p in extra)
    for relation, templates in EXTRA_QUESTIONS.items():
        assert not set(templates) & set(FACT_QUESTIONS[relation])
        assert all(t.count("{}") == 1 and RELATION_NOUNS[relation] in t
                   for t in templates)
    text = render(extra[0], "plain", rng, extended.tokenizer).ids
    assert extra[0].operands[0] in bytes(i for i in text if i < 256).decode()
    plain = random.Random(3)  # without extras the draws are those of before
    assert all(Corpus(0).draw_problem("train", "fact", 1, plain).phrasing < 10
               for _ in range(100))


def test_answers_are_right():
    rng = random.Random(2)
    for task in ("add", "sub", "mul"):
        for difficulty in DIFFICULTIES[task]:
            p = arithmetic_problem(task, difficulty, rng)
            a, op, b = p.operands
            assert int(p.answer) == eval(f"{a}{op}{b}")  # noqa: S307 - digits and one operator
            assert len(a) == difficulty
    for difficulty in DIFFICULTIES["expr"]:
        p = arithmetic_problem("expr", difficulty, rng)
        assert int(p.answer) == eval("".join(p.operands))  # noqa: S307
        assert len(p.operands) == 2 * difficulty + 1
    assert eval_expression(["2", "+", "3", "*", "4", "-", "5"]) == 9


def test_formats(corpus):
    tok = ByteTokenizer()
    rng = random.Random(5)
    seen = set()
    for _ in range(200):
        example = corpus.sample("train", rng)
        seen.add(example.format)
        assert example.ids[0] == tok.bos_token_id and example.ids[-1] == tok.eos_token_id
        prompt = tok.decode(example.prompt, skip_special=False)
        if example.format == "chat":
            assert prompt.startswith("<bos><|user|>") and prompt.endswith("<eos><|assistant|>")
            assert tok.decode(example.answer_ids) == example.problem.answer
        elif example.problem.task == "fact":
            assert prompt.startswith("<bos>Q: ") and prompt.endswith("\nA:")
            assert tok.decode(example.answer_ids) == f" {example.problem.answer}"
        else:
            assert prompt.endswith("=")
            assert tok.decode(example.answer_ids) == example.problem.answer
    assert seen == {"chat", "plain"}


def test_fact_names_are_unambiguous(corpus):
    names = list(corpus.world.countries) + [a for f in corpus.world.facts.values()
                                            for a in f.values()]
    assert len(set(names)) == len(names)
    for x in names:
        assert not any(y != x and y.startswith(x) for y in names)
