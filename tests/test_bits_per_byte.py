"""benchmarks/bits_per_byte.py against a live server of the bundled model: its JSON last
line, and its bits per byte equal to what `reference_forward` gives for the same texts, in
exact and adaptive semantics, next to the loops each spent."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import bits_per_byte
from model.tokenizer import ByteTokenizer
from model.weights import BUNDLED_MODEL_DIR, load_model
from tests.server_helpers import LiveServer, engine_config

LIMIT = 20  # problems of each group (facts, arithmetic)


@pytest.fixture(scope="module")
def report():
    with LiveServer(BUNDLED_MODEL_DIR, engine_config(num_kv_blocks=512, block_size=16)) as live:
        return bits_per_byte.main(["--url", live.url, "--limit", str(LIMIT)])


def reference_bits(threshold: float | None) -> dict[str, float]:
    """Answer bits per byte of the first LIMIT problems from the uncached forward."""
    model, tok = load_model(BUNDLED_MODEL_DIR), ByteTokenizer()
    bits = {"text": 0.0, "answer": 0.0}
    sizes = {"text": 0, "answer": 0}
    for _, prompt, answer in bits_per_byte.held_out_texts(bits_per_byte.HELD_OUT, LIMIT):
        prompt_len = len(tok.encode(prompt, add_bos=True))
        ids = tok.encode(prompt + answer, add_bos=True)
        with torch.no_grad():
            logits = model.reference_forward(torch.tensor([ids]), halt_threshold=threshold
                                             ).logits[0].float()
        nats = -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])
        bits["text"] += nats.sum().item() / math.log(2)
        bits["answer"] += nats[prompt_len - 1:].sum().item() / math.log(2)
        sizes["text"] += len(ids) - 1
        sizes["answer"] += len(answer.encode())
    return {k: bits[k] / sizes[k] for k in bits}


def test_the_report(report):
    assert report["benchmark"] == "bits_per_byte" and report["model"] == "loopserve-tiny"
    for semantics in ("exact", "adaptive"):
        groups = report[semantics]
        assert {"arithmetic", "fact", "all"} <= set(groups)
        assert groups["fact"]["texts"] == groups["arithmetic"]["texts"] == LIMIT
        assert groups["all"]["answer_bytes"] == (groups["arithmetic"]["answer_bytes"]
                                                 + groups["fact"]["answer_bytes"])


@pytest.mark.parametrize("semantics", ["exact", "adaptive"])
def test_bits_per_byte_equal_the_reference(report, semantics):
    threshold = None if semantics == "exact" else load_model(
        BUNDLED_MODEL_DIR).config.halt_threshold
    expected = reference_bits(threshold)
    measured = report[semantics]["all"]
    assert measured["answer_bits_per_byte"] == pytest.approx(expected["answer"], abs=1e-3)
    assert measured["text_bits_per_byte"] == pytest.approx(expected["text"], abs=1e-3)


def test_loops_spent_in_each_semantics(report):
    assert report["exact"]["mean_loops_per_token"] == 3.0
    assert report["exact"]["compute_saved"] == 0.0
    adaptive = report["adaptive"]
    assert 1.0 <= adaptive["mean_loops_per_token"] < 3.0 and adaptive["compute_saved"] > 0.2
    assert adaptive["flops"] < report["exact"]["flops"]
    # the trained model knows its answers: far below the 8 bits of a uniform byte
    assert adaptive["all"]["answer_bits_per_byte"] < 2.0
