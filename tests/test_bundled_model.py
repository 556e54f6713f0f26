"""The shipped checkpoint (models/loopserve-tiny): complete, loads by default, and answers
held-out questions it never saw, in both prompt formats.

The checks use what the card measures it to do reliably: fact questions in their test-only
phrasings (86.5%, so a few may fail), and 1- and 2-digit addition (100%).
"""

from __future__ import annotations

import json

import pytest

from engine import ByteTokenizer, load_model
from model.weights import BUNDLED_MODEL_DIR
from training.data import Corpus
from training.decode import greedy_decode


@pytest.fixture(scope="module")
def model():
    return load_model()


def held_out(task: str, difficulty: int, count: int) -> list:
    return [e for e in Corpus(0).held_out("test", 2)
            if e.problem.task == task and e.problem.difficulty == difficulty][:count]


def wrong_answers(model, examples) -> list[tuple[str, str]]:
    generated = greedy_decode(model, [e.prompt for e in examples], model.config.halt_threshold)
    tok = ByteTokenizer()
    return [(tok.decode(e.prompt), tok.decode(g)) for e, g in zip(examples, generated,
                                                                 strict=True)
            if g != e.answer_ids]


def test_bundled_checkpoint_is_complete():
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "README.md",
                 "eval.json", "eval.png"):
        assert (BUNDLED_MODEL_DIR / name).is_file(), name
    assert (BUNDLED_MODEL_DIR / "model.safetensors").stat().st_size < 8_000_000
    assert json.loads((BUNDLED_MODEL_DIR / "tokenizer_config.json").read_text())["type"] == "byte"


def test_recalls_facts_asked_in_held_out_phrasings(model):
    examples = held_out("fact", 1, 16)
    assert {e.format for e in examples} == {"chat", "plain"}
    assert len(wrong_answers(model, examples)) <= 3  # the card reports 86.5% recall


@pytest.mark.parametrize("digits", [1, 2])
def test_adds_held_out_numbers(model, digits):
    examples = held_out("add", digits, 4)
    assert examples
    assert not wrong_answers(model, examples)


def test_chat_template_from_text(model):
    tok = ByteTokenizer()
    country = Corpus(0).world.countries[0]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": f"What is the capital of {country}?"}])
    generated = greedy_decode(model, [prompt], model.config.halt_threshold)[0]
    assert tok.decode(generated) == Corpus(0).world.facts[country]["capital"]
