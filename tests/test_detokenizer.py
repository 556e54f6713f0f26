"""Detokenization and stop strings in the API process (`RequestDetokenizer` over an engine
that sends token ids only) give exactly what the one-process engine gives: text, finish and
stop reasons, kept tokens and logprobs, for stop strings that span tokens, min_tokens,
n > 1 and streamed deltas; a request that a stop string ended is aborted in the core and its
final delta reports the stop."""

from __future__ import annotations

import pytest

from engine import LLMEngine, SamplingParams, load_tokenizer
from engine.detokenizer import RequestDetokenizer
from engine.request import RequestOutput
from tests.helpers import make_model
from tests.server_helpers import engine_config


@pytest.fixture(scope="module")
def model():
    return make_model(seed=3)


def _engine(model, detokenize: bool) -> LLMEngine:
    return LLMEngine(model, load_tokenizer(None, model.config), engine_config(),
                     detokenize=detokenize)


def _run_in_one_process(model, prompt: str, params: SamplingParams) -> list[RequestOutput]:
    llm = _engine(model, detokenize=True)
    llm.add_request(llm.prepare(prompt, params, "r"))
    deltas = []
    while llm.has_unfinished():
        deltas += llm.step()
    return deltas


def _run_split(model, prompt: str, params: SamplingParams) -> tuple[list[RequestOutput], int]:
    """The core's deltas through the API side's detokenizer, aborting as the client does."""
    core = _engine(model, detokenize=False)
    core.add_request(core.prepare(prompt, params, "r"))
    texts = RequestDetokenizer(core.tokenizer, params)
    deltas, aborts = [], 0
    while core.has_unfinished():
        for output in core.step():
            deltas.append(texts.process(output))
            if texts.stopped_here and not output.finished and aborts == 0:
                aborts += 1
                final = core.abort_request("r")
                deltas.append(texts.process(final))
    return deltas, aborts


def _merged(deltas: list[RequestOutput]) -> dict[int, dict]:
    choices: dict[int, dict] = {}
    for delta in deltas:
        for piece in delta.outputs:
            c = choices.setdefault(piece.index, {"text": "", "ids": [], "logprobs": []})
            c["text"] += piece.text
            c["ids"] += piece.token_ids
            c["logprobs"] += [lp.token_id for lp in piece.logprobs or []]
            c.update(finish=piece.finish_reason, stop=piece.stop_reason, n=piece.num_tokens)
    return choices


def _reference_text(model, prompt: str) -> str:
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    return _merged(_run_in_one_process(model, prompt, params))[0]["text"]


@pytest.mark.parametrize("case", ["one char", "two chars", "min_tokens", "n=2", "no stop"])
def test_the_split_detokenizer_equals_the_one_process_engine(model, case):
    prompt = "stop strings"
    text = _reference_text(model, prompt)
    printable = [ch for ch in text[3:] if ch.isprintable() and ch != "\ufffd"]
    assert printable, text
    stop = {"one char": [printable[0]], "two chars": [text[text.index(printable[0]) - 1:
                                                           text.index(printable[0]) + 1]],
            "min_tokens": [printable[0]], "n=2": [printable[0], printable[-1]],
            "no stop": []}[case]
    params = SamplingParams(max_tokens=30, temperature=0.0 if case != "n=2" else 1.0,
                            seed=7, ignore_eos=True, stop=stop, logprobs=1,
                            n=2 if case == "n=2" else 1,
                            min_tokens=text.index(printable[0]) + 2 if case == "min_tokens"
                            else 0)
    expected = _merged(_run_in_one_process(model, prompt, params))
    split, aborts = _run_split(model, prompt, params)
    got = _merged(split)
    assert got == expected
    assert split[-1].finished and split[-1].compute is not None
    stopped = any(c["stop"] in stop for c in expected.values() if c["finish"] == "stop")
    if case in ("one char", "two chars"):
        assert stopped and aborts == 1  # the stop string ended it early, in the core too
    if case == "no stop":
        assert aborts == 0 and expected[0]["finish"] == "length"


def test_text_that_may_start_a_stop_string_is_held_back(model):
    prompt = "hold back"
    text = _reference_text(model, prompt)
    printable = "".join(ch for ch in text if ch.isprintable() and ch != "\ufffd")
    stop = printable[2:4] + "\u2603"  # starts like the text, never completes
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop])
    split, _ = _run_split(model, prompt, params)
    tokenizer = load_tokenizer(None, model.config)
    streamed, ids = "", []
    for delta in split:
        for piece in delta.outputs:
            streamed, ids = streamed + piece.text, ids + piece.token_ids
            if piece.finish_reason is None:  # the last len(stop) - 1 characters wait
                assert len(streamed) <= max(0, len(tokenizer.decode(ids)) - (len(stop) - 1))
    assert streamed == text
