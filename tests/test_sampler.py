"""Sampler and SamplingParams: properties of each transform, seeds, stops, typed errors."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, InvalidRequestError, ModelConfig, SamplingParams
from engine.request import Request
from engine.sampler import Sampler, apply_penalties, filtered_probs
from tests.helpers import make_model, make_request

CFG = ModelConfig()


def request_with(params: SamplingParams, tokens=(1, 2, 3), output=()) -> Request:
    return make_request("r#0", list(tokens), params, output=tuple(output), parent="r")


def test_top_k_one_equals_greedy():
    logits = torch.randn(5, 264, generator=torch.Generator().manual_seed(0))
    greedy = Sampler()(logits, [request_with(SamplingParams(temperature=0))] * 5)
    top1 = Sampler()(logits, [request_with(SamplingParams(temperature=1.3, top_k=1))] * 5)
    assert greedy.token_ids == top1.token_ids == logits.argmax(-1).tolist()


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -5.0])
    assert (filtered_probs(logits, SamplingParams(top_k=2)) > 0).tolist() == [
        True, True, False, False, False]
    probs = torch.softmax(logits, -1)  # ~[0.66, 0.24, 0.09, 0.03, 0.0]
    kept = filtered_probs(logits, SamplingParams(top_p=0.8)) > 0
    assert kept.tolist() == [True, True, False, False, False]
    kept = filtered_probs(logits, SamplingParams(min_p=0.1)) > 0
    assert kept.tolist() == (probs >= 0.1 * probs.max()).tolist()
    assert filtered_probs(logits, SamplingParams(top_p=0.01)).tolist()[0] == 1.0


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 1.0])
    row = logits.clone()
    apply_penalties(row, request_with(SamplingParams(repetition_penalty=2.0), tokens=[0, 1]))
    assert row.tolist() == [1.0, -4.0, 1.0, 1.0]
    row = logits.clone()
    apply_penalties(row, request_with(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
                                      tokens=[3], output=[2, 2]))
    assert row.tolist() == [2.0, -2.0, 1.0 - 0.5 - 0.5, 1.0]


def test_seeded_sampling_is_reproducible_and_batch_independent():
    model = make_model(seed=1)
    llm = LLM(model, num_kv_blocks=128, block_size=4)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    first = llm.generate(["seeded"], params)[0].token_ids
    crowd = [SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)] * 4
    again = llm.generate(["noise a", "seeded", "noise b"], [crowd[0], params, crowd[1]])
    assert again[1].token_ids == first
    other = llm.generate(["seeded"], SamplingParams(max_tokens=12, temperature=1.0, seed=99,
                                                    ignore_eos=True))[0].token_ids
    assert other != first


def test_n_choices_differ_and_logprobs_are_reported():
    llm = LLM(make_model(seed=2), num_kv_blocks=128, block_size=4)
    out = llm.generate(["abc"], SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=7,
                                               logprobs=3, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for choice in out.outputs:
        assert len(choice.logprobs) == 6
        for token, entry in zip(choice.token_ids, choice.logprobs, strict=True):
            assert entry.token_id == token and entry.logprob <= 0
            assert len(entry.top_logprobs) == 3
            values = [lp for _, lp in entry.top_logprobs]
            assert values == sorted(values, reverse=True)
    assert out.compute["loops_per_layer"]


def test_stop_strings_are_cut_and_not_emitted():
    llm = LLM(make_model(seed=3), num_kv_blocks=128, block_size=4)
    free = llm.generate(["stop me"], SamplingParams(max_tokens=30, temperature=0,
                                                    ignore_eos=True))[0]
    text = free.text
    assert len(text) > 6
    stop = text[3:5]
    cut = llm.generate(["stop me"], SamplingParams(max_tokens=30, temperature=0, stop=[stop],
                                                   ignore_eos=True))[0]
    assert cut.finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    assert cut.text == text[:text.find(stop)]
    token = free.token_ids[2]
    by_id = llm.generate(["stop me"], SamplingParams(max_tokens=30, temperature=0,
                                                     stop_token_ids=[token], ignore_eos=True))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[:3]


def test_eos_ends_unless_ignored():
    model = make_model(seed=4)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] += 50.0  # eos always wins
    llm = LLM(model, num_kv_blocks=64)
    out = llm.generate(["x"], SamplingParams(max_tokens=5, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids == [model.config.eos_token_id]
    assert out.text == ""
    out = llm.generate(["x"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"min_p": 2.0}, "min_p"), ({"n": 0}, "n"), ({"n": 100}, "n"),
    ({"logprobs": 21}, "logprobs"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"halt_threshold": 1.0}, "halt_threshold"),
    ({"halt_threshold": -0.5}, "halt_threshold"), ({"max_loops": 0}, "max_loops"),
    ({"stop": [""]}, "stop"), ({"stop": ["x"] * 17}, "stop"), ({"seed": "abc"}, "seed"),
    ({"seed": 2**70}, "seed"), ({"seed": -1}, "seed"),
    ({"temperature": float("nan")}, "temperature"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_bad_sampling_params_raise_typed_errors(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert param in str(info.value)


def test_max_loops_is_checked_against_the_model():
    with pytest.raises(InvalidRequestError, match="max_loops must be between 1 and 3, got 7"):
        SamplingParams(max_loops=7).check_against(CFG)


def test_vanishing_temperature_or_top_p_is_greedy_not_garbage():
    logits = torch.randn(3, 264, generator=torch.Generator().manual_seed(1))
    for params in (SamplingParams(temperature=1e-300), SamplingParams(top_p=1e-300),
                   SamplingParams(temperature=1e-30, top_p=1e-300)):
        out = Sampler()(logits, [request_with(params)] * 3)
        assert out.token_ids == logits.argmax(-1).tolist()
