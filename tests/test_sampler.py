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
    assert out.compute.loops_per_layer


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


# ---------------------------------------------------------------------- the batched sampler
def reference_adjusted(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """The per-row semantics [V], written plainly: logit bias, the min_tokens mask, then
    repetition (prompt + output), presence and frequency (output) penalties."""
    params, row = request.params, logits.clone()
    for token, bias in params.logit_bias:
        row[token] += bias
    if request.num_output_tokens < params.min_tokens:
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos
                                               else {request.eos_token_id})
        row[sorted(banned)] = float("-inf")
    if params.repetition_penalty != 1.0:
        for token in set(request.token_ids):
            value = row[token]
            row[token] = (value / params.repetition_penalty if value > 0
                          else value * params.repetition_penalty)
    for token in set(request.output_token_ids):
        count = request.output_token_ids.count(token)
        row[token] -= params.frequency_penalty * count + params.presence_penalty
    return row


def reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on one row [V], written plainly."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[0]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs
        drop = torch.zeros_like(probs, dtype=torch.bool)
        drop[order] = before >= params.top_p
        probs = probs.masked_fill(drop, 0.0)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return probs / probs.sum()


MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7, top_k=5, seed=11),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.2, seed=12, logprobs=3),
    SamplingParams(temperature=0, repetition_penalty=1.7),
    SamplingParams(temperature=0.9, presence_penalty=1.0, frequency_penalty=0.5, top_k=20,
                   top_p=0.9, min_p=0.01, seed=13),
    SamplingParams(temperature=0, logit_bias={7: 30.0, 9: -100.0}, logprobs=0),
    SamplingParams(temperature=0.8, min_tokens=5, stop_token_ids=[4, 8], seed=14),
    SamplingParams(temperature=0, min_tokens=9, ignore_eos=True, stop_token_ids=[3]),
    SamplingParams(temperature=1.1, repetition_penalty=0.8, logit_bias={2: 3.5}, top_k=1),
]


def mixed_requests() -> list[Request]:
    """One request per MIXED entry, with histories that the penalties and masks see."""
    gen = torch.Generator().manual_seed(5)
    requests = []
    for i, params in enumerate(MIXED):
        prompt = torch.randint(0, 264, (6,), generator=gen).tolist()
        output = torch.randint(0, 264, (i % 4,), generator=gen).tolist() + [prompt[0]] * (i % 3)
        requests.append(request_with(params, tokens=prompt, output=output))
    return requests


def test_batched_adjustments_and_filters_equal_the_per_row_semantics():
    from engine.sampling_batch import LogitAdjustments, SamplingFilters

    requests = mixed_requests()
    logits = torch.randn(len(requests), 264, generator=torch.Generator().manual_seed(6)) * 3
    adjusted = LogitAdjustments.build(requests, logits.device).apply(logits)
    filters = SamplingFilters.build([r.params for r in requests], 264, logits.device)
    probs = filters.probs(adjusted)
    for row, request in enumerate(requests):
        expected = reference_adjusted(logits[row], request)
        torch.testing.assert_close(adjusted[row], expected, rtol=0, atol=1e-5)
        if not request.params.greedy:
            torch.testing.assert_close(probs[row], reference_probs(expected, request.params),
                                       rtol=0, atol=1e-6)
    assert (adjusted[7, [4, 8, CFG.eos_token_id]] == float("-inf")).all()  # short of min_tokens
    assert adjusted[8, 3] == float("-inf") and adjusted[8, CFG.eos_token_id] > float("-inf")


def test_batched_sampler_rows_equal_each_row_alone():
    """Greedy rows take the argmax of the adjusted logits; a seeded row draws the same
    tokens in a mixed batch as alone, step after step; logprobs are the raw model's."""
    logits = torch.randn(len(MIXED), 264, generator=torch.Generator().manual_seed(7)) * 3
    batch, alone = mixed_requests(), mixed_requests()
    sampler = Sampler(seed=3)
    for _ in range(3):
        together = sampler(logits, batch)
        for row, request in enumerate(alone):
            single = Sampler(seed=99)(logits[row:row + 1], [request])
            if request.params.greedy or request.params.seed is not None:
                assert together.token_ids[row] == single.token_ids[0], f"row {row}"
            if request.params.greedy:
                expected = int(reference_adjusted(logits[row], request).argmax())
                assert together.token_ids[row] == expected
    raw = logits.log_softmax(dim=-1)
    for row, entry in enumerate(together.logprobs):
        count = MIXED[row].logprobs
        if count is None:
            assert entry is None
            continue
        assert entry.token_id == together.token_ids[row]
        assert entry.logprob == pytest.approx(float(raw[row, entry.token_id]), abs=1e-6)
        top = torch.topk(raw[row], count) if count else None
        assert [t for t, _ in entry.top_logprobs] == (top.indices.tolist() if count else [])


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, top_k=5, top_p=0.95, min_p=0.02),  # among top-k candidates
    SamplingParams(temperature=0.7, top_p=0.9, min_p=0.02),  # over the whole vocabulary
])
def test_batched_draw_follows_the_filtered_distribution(params):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 20000
    requests = [request_with(params)] * rows
    tokens = Sampler(seed=1)(logits.expand(rows, -1), requests).token_ids
    frequency = torch.bincount(torch.tensor(tokens), minlength=7).double() / rows
    expected = reference_probs(logits, params).double()
    assert expected[-1] == 0 and frequency[-1] == 0  # filtered out: never drawn
    torch.testing.assert_close(frequency, expected, rtol=0, atol=0.015)


def test_top_k_candidates_give_the_full_vocabulary_distribution():
    """When every sampled row has a top_k, filtering among each row's top max(top_k)
    candidates gives the same probabilities as filtering the whole vocabulary."""
    from engine.sampling_batch import SamplingFilters

    params = [SamplingParams(temperature=0.8, top_k=3), SamplingParams(temperature=0),
              SamplingParams(temperature=1.2, top_k=40, top_p=0.5),
              SamplingParams(temperature=1.0, top_k=17, min_p=0.1)]
    logits = torch.randn(len(params), 264, generator=torch.Generator().manual_seed(8)) * 2
    filters = SamplingFilters.build(params, 264, logits.device)
    values, ids = filters.candidates(logits)
    assert filters.max_top_k == 40 and ids.shape == (4, 40)
    probs = torch.zeros_like(logits).scatter_(1, ids, filters.probs(values, ranked=True))
    for row, p in enumerate(params):
        if not p.greedy:
            torch.testing.assert_close(probs[row], reference_probs(logits[row], p), rtol=0,
                                       atol=1e-6)


def test_a_seeded_row_draws_the_same_whichever_columns_its_batch_keeps():
    """The same seeded top-k request, in a batch where every row has a top_k (candidate
    columns) and in one with a row over the whole vocabulary, samples the same tokens."""
    from engine.sampling_batch import SamplingFilters

    seeded = SamplingParams(temperature=1.5, top_k=30, seed=21)
    partners = {"candidates": SamplingParams(temperature=1.0, top_k=60),
                "whole vocabulary": SamplingParams(temperature=1.0)}
    logits = torch.randn(2, 264, generator=torch.Generator().manual_seed(9))
    drawn = {}
    for name, partner in partners.items():
        assert (SamplingFilters.build([seeded, partner], 264, logits.device).max_top_k
                is None) == (name == "whole vocabulary")
        target, sampler = request_with(seeded), Sampler(seed=len(name))
        drawn[name] = [sampler(logits, [target, request_with(partner)]).token_ids[0]
                       for _ in range(12)]
    assert drawn["candidates"] == drawn["whole vocabulary"]
    assert len(set(drawn["candidates"])) > 1


def test_sampler_reads_back_once_and_never_syncs_before(monkeypatch):
    """One `.tolist()` per call; no `.item()`, `nonzero` or other host sync on the way, and
    the number of ops does not grow with the batch (no Python loop over unseeded rows)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))
    unseeded = [SamplingParams(**{**vars(p), "seed": None}) for p in MIXED]

    def run(copies: int) -> list[str]:
        requests = [request_with(p, output=(1, 2, 2)) for p in unseeded * copies]
        logits = torch.randn(len(requests), 264)
        reads.clear()
        with OpCounter() as counter:
            Sampler()(logits, requests)
        assert len(reads) == 1
        return counter.ops

    small, large = run(1), run(8)
    syncs = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.item.default"}
    assert not syncs & set(small)
    assert len(small) == len(large)


def test_generators_are_created_on_the_logits_device_at_first_draw():
    request = request_with(SamplingParams(temperature=1.0, seed=5))
    assert request.generator is None
    sampler = Sampler(seed=2)
    sampler(torch.randn(1, 264), [request])
    assert request.generator is not None and request.generator.device.type == "cpu"
    assert sampler.generator_on(torch.device("cpu")).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_sampler_syncs_only_at_its_read_back(monkeypatch):
    logits = torch.randn(len(MIXED), 264, generator=torch.Generator().manual_seed(7)) * 3
    on_cpu = Sampler()(logits, mixed_requests())
    requests, logits = mixed_requests(), logits.cuda()
    torch.cuda.set_sync_debug_mode("error")  # any sync before the read-back raises
    try:
        draw = Sampler().sample(logits, requests)  # everything but the read-back
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_cuda = draw.result(draw.table.cpu())
    greedy = [row for row, p in enumerate(MIXED) if p.greedy]
    assert [on_cuda.token_ids[r] for r in greedy] == [on_cpu.token_ids[r] for r in greedy]
    seeded = [r for r in requests if r.params.seed is not None and not r.params.greedy]
    assert seeded and all(r.generator.device.type == "cuda" for r in seeded)


# ---------------------------------------------------------------------- new fields
def test_logit_bias_steers_and_bans_tokens():
    llm = LLM(make_model(seed=5), num_kv_blocks=64, block_size=4)
    forced = llm.generate(["bias"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                   logit_bias={65: 100.0}))[0]
    assert forced.token_ids == [65] * 4
    free = llm.generate(["bias"], SamplingParams(max_tokens=1, **GREEDY_PARAMS))[0].token_ids[0]
    banned = llm.generate(["bias"], SamplingParams(max_tokens=3, temperature=1.0, seed=1,
                                                   ignore_eos=True,
                                                   logit_bias={free: -100.0}))[0]
    assert free not in banned.token_ids[:1]
    assert SamplingParams(logit_bias={3: 1.0, 1: -2}).logit_bias == ((1, -2.0), (3, 1.0))
    assert hash(SamplingParams(logit_bias={3: 1.0})) == hash(SamplingParams(logit_bias=[(3, 1)]))


GREEDY_PARAMS = dict(temperature=0, ignore_eos=True)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_holds_back_eos(temperature):
    model = make_model(seed=4)
    eos = model.config.eos_token_id
    llm = LLM(model, num_kv_blocks=64)
    out = llm.generate(["x"], SamplingParams(max_tokens=8, temperature=temperature, seed=3,
                                             min_tokens=3, logit_bias={eos: 100.0}))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 4  # eos wins at once after
    assert out.token_ids[-1] == eos and eos not in out.token_ids[:3]
    out = llm.generate(["x"], SamplingParams(max_tokens=8, temperature=temperature, seed=3,
                                             logit_bias={eos: 100.0}))[0]
    assert out.token_ids == [eos]


def test_min_tokens_holds_back_stop_token_ids_and_stop_strings():
    llm = LLM(make_model(seed=3), num_kv_blocks=128, block_size=4)
    free = llm.generate(["stop me"], SamplingParams(max_tokens=30, **GREEDY_PARAMS))[0]
    first = free.token_ids[0]
    held = llm.generate(["stop me"], SamplingParams(max_tokens=30, min_tokens=4,
                                                    stop_token_ids=[first],
                                                    **GREEDY_PARAMS))[0]
    assert first not in held.token_ids[:4]
    assert len(held.token_ids) >= 5 or held.finish_reason == "length"
    stop = free.text[:2]
    cut = llm.generate(["stop me"], SamplingParams(max_tokens=30, stop=[stop], min_tokens=4,
                                                   **GREEDY_PARAMS))[0]
    assert cut.token_ids[:4] == free.token_ids[:4] and len(cut.token_ids) >= 5
    assert cut.text.startswith(free.text[:4])


@pytest.mark.parametrize("kwargs, param", [
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 17}, "min_tokens"),
    ({"min_tokens": 1.5}, "min_tokens"), ({"logit_bias": {5: 100.5}}, "logit_bias"),
    ({"logit_bias": {5: float("inf")}}, "logit_bias"), ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"), ({"logit_bias": [(1, 1), (1, 2)]}, "logit_bias"),
    ({"logit_bias": 3}, "logit_bias"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"prompt_logprobs": True}, "prompt_logprobs"),
    ({"priority": "high"}, "priority"), ({"priority": 2**64}, "priority"),
    ({"max_tokens": 0, "logprobs": 1}, "max_tokens"),
    ({"max_tokens": -1, "prompt_logprobs": 1}, "max_tokens"),
])
def test_bad_new_fields_raise_typed_errors(kwargs, param):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert param in str(info.value)


def test_new_fields_in_range_are_accepted():
    params = SamplingParams(max_tokens=0, prompt_logprobs=0, priority=-3)
    assert params.max_tokens == 0 and params.min_tokens == 0 and params.priority == -3
    assert SamplingParams(min_tokens=16, max_tokens=16, logit_bias={0: -100, 263: 100})
    with pytest.raises(InvalidRequestError, match="below vocab_size 264, got 264") as info:
        SamplingParams(logit_bias={264: 1.0}).check_against(CFG)
    assert info.value.param == "logit_bias"
