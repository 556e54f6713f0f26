"""Output kinds: a FINAL request gets one output, when it finishes, equal to its DELTA
outputs merged (tokens, text, logprobs, prompt logprobs, every choice), with the times its
held-back deltas were ready; an abort still hands back what it produced."""

from __future__ import annotations

import dataclasses

import pytest

from engine import InvalidRequestError
from engine.core_client import watchable
from engine.llm import LLM, _accumulate, _merged
from engine.sampling_params import OutputKind, SamplingParams
from tests.helpers import make_model, random_prompts


@pytest.fixture(scope="module")
def llm():
    return LLM(make_model(seed=5), num_kv_blocks=128, block_size=4)


def _run(engine, requests):
    """Step until done: every output of each request, in order."""
    seen = {r.request_id: [] for r in requests}
    for request in requests:
        engine.add_request(request)
    while engine.has_unfinished():
        for output in engine.step():
            seen[output.request_id].append(output)
    return seen


PARAMS = SamplingParams(max_tokens=7, temperature=0.8, seed=11, n=2, logprobs=2,
                        prompt_logprobs=1, ignore_eos=True)


def test_a_final_request_gets_one_output_equal_to_its_deltas_merged(llm):
    engine = llm.engine
    prompts = random_prompts(2, seed=7, low=5, high=12)
    delta = [engine.prepare(p, PARAMS) for p in prompts]
    final_params = dataclasses.replace(PARAMS, output_kind=OutputKind.FINAL)
    final = [engine.prepare(p, final_params) for p in prompts]
    seen = _run(engine, delta + final)  # one batch: the same tokens (batch invariance)
    for d, f in zip(delta, final, strict=True):
        deltas, (only,) = seen[d.request_id], seen[f.request_id]
        assert len(deltas) == 7 and only.finished
        choices = {}
        for out in deltas:
            _accumulate(choices, out)
        merged = _merged(deltas[-1], choices, deltas[0].prompt_logprobs)
        assert [c.token_ids for c in only.outputs] == [c.token_ids for c in merged.outputs]
        assert [c.text for c in only.outputs] == [c.text for c in merged.outputs]
        assert [c.finish_reason for c in only.outputs] == ["length", "length"]
        assert [[t.token_id for t in c.logprobs] for c in only.outputs] == [
            [t.token_id for t in c.logprobs] for c in merged.outputs]
        assert only.prompt_logprobs == merged.prompt_logprobs
        assert only.compute.flops == pytest.approx(merged.compute.flops)
        held = only.metrics["held_delta_times"]  # the 6 steps before the last
        assert len(held) == 6 and held == sorted(held)
        assert only.metrics["first_token_time"] <= held[0] <= only.metrics["finished_time"]
        assert "held_delta_times" not in deltas[-1].metrics
    engine.block_manager.check_integrity()


def test_an_aborted_final_request_hands_back_what_it_produced(llm):
    engine = llm.engine
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True,
                            output_kind=OutputKind.FINAL)
    request = engine.prepare(random_prompts(1, seed=8)[0], params)
    engine.add_request(request)
    for _ in range(4):
        assert engine.step() == []  # nothing before the end
    final = engine.abort_request(request.request_id)
    assert final.finished and final.finish_reason == "abort"
    assert len(final.token_ids) == 4 and len(final.metrics["held_delta_times"]) == 4
    assert not engine.has_unfinished()
    engine.block_manager.check_integrity()


def test_output_kind_is_checked_and_accepts_its_names():
    assert SamplingParams(output_kind="final").output_kind is OutputKind.FINAL
    with pytest.raises(InvalidRequestError, match="output_kind must be one of") as info:
        SamplingParams(output_kind="cumulative")
    assert info.value.param == "output_kind"


def test_a_final_request_with_stop_strings_is_watched_delta_by_delta(llm):
    """The API process matches stop strings on each delta's text (engine-core mode)."""
    final = SamplingParams(output_kind=OutputKind.FINAL)
    plain = llm.engine.prepare("abc", final)
    assert watchable(plain) is plain
    stopped = watchable(llm.engine.prepare("abc", dataclasses.replace(final, stop=("x",))))
    assert stopped.params.output_kind is OutputKind.DELTA and stopped.params.stop == ("x",)
