"""Prompt logprobs against the reference forward's log-softmax (fp32 CPU, within 1e-4), in
the served semantics (each request's threshold and max_loops), under chunked prefill, a
warm prefix cache, preemption, n > 1 and max_tokens=0; delivered once, never duplicated."""

from __future__ import annotations

import pytest
import torch

from engine import InvalidRequestError
from engine.llm import LLM
from engine.request import RequestOutput
from engine.sampling_params import SamplingParams
from tests.helpers import GREEDY, make_model, random_prompts, reference_greedy, served_threshold

THRESHOLDS = [None, 0.0, 0.2, 0.5, 0.05]
LOOPS = [None, 1, 2, 3]


@pytest.fixture(scope="module")
def model():
    return make_model(seed=3)


def scoring_params(count: int, max_tokens: int = 3) -> list[SamplingParams]:
    """Greedy requests with prompt logprobs and a mix of thresholds, max_loops and k."""
    return [SamplingParams(max_tokens=max_tokens, halt_threshold=THRESHOLDS[i % 5],
                           max_loops=LOOPS[i % 4], prompt_logprobs=[0, 1, 5][i % 3], **GREEDY)
            for i in range(count)]


def reference_logprobs(model, llm: LLM, prompt: list[int], params: SamplingParams
                       ) -> torch.Tensor:
    """[T, V] log-softmax of the reference forward in the semantics the engine serves."""
    out = model.reference_forward(torch.tensor([prompt], device=model.device),
                                  halt_threshold=served_threshold(model, llm, params),
                                  max_loops=params.max_loops)
    return out.logits[0].log_softmax(dim=-1)


def check_prompt_logprobs(model, llm: LLM, prompt: list[int], params: SamplingParams,
                          out: RequestOutput) -> None:
    expected = reference_logprobs(model, llm, prompt, params)
    entries = out.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt)
    assert entries[0] is None
    for position, entry in enumerate(entries[1:], start=1):
        row = expected[position - 1]
        assert entry.token_id == prompt[position]
        assert entry.logprob == pytest.approx(float(row[prompt[position]]), abs=1e-4)
        assert len(entry.top_logprobs) == params.prompt_logprobs
        values = [v for _, v in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        torch.testing.assert_close(torch.tensor(values), torch.topk(row, len(values)).values.cpu(),
                                   rtol=0, atol=1e-4)
        for token, value in entry.top_logprobs:
            assert value == pytest.approx(float(row[token]), abs=1e-4)


def check_all(model, llm: LLM, prompts, params_list) -> list[RequestOutput]:
    """Prompt logprobs equal the reference; generated tokens too; the pool ends empty."""
    outputs = llm.generate(prompts, params_list)
    for prompt, params, out in zip(prompts, params_list, outputs, strict=True):
        check_prompt_logprobs(model, llm, prompt, params, out)
        tokens, _ = reference_greedy(model, prompt, params.max_tokens,
                                     served_threshold(model, llm, params), params.max_loops)
        assert out.token_ids == tokens
    llm.engine.block_manager.check_integrity()
    assert llm.engine.block_manager.usage() == 0.0
    return outputs


def test_prompt_logprobs_equal_reference_for_mixed_thresholds_and_loops(model):
    llm = LLM(model, num_kv_blocks=128, block_size=4)
    prompts = random_prompts(10, seed=30)
    check_all(model, llm, prompts, scoring_params(10))


def test_prompt_logprobs_are_those_of_the_served_semantics(model):
    """Served logprobs differ from the exact ones by far more than the 1e-4 tolerance: the
    reference checks would catch a prompt computed in the wrong semantics."""
    llm = LLM(model, num_kv_blocks=64, block_size=4)
    prompt = random_prompts(1, seed=31, low=20, high=21)[0]
    params = SamplingParams(max_tokens=1, halt_threshold=0.5, max_loops=1, prompt_logprobs=0,
                            **GREEDY)
    out = llm.generate([prompt], params)[0]
    ids = torch.tensor([prompt], device=model.device)
    exact = model.reference_forward(ids).logits[0].log_softmax(dim=-1)
    gaps = [abs(e.logprob - float(exact[p - 1, prompt[p]]))
            for p, e in enumerate(out.prompt_logprobs) if p]
    assert max(gaps) > 1e-3


def test_chunked_prefill_fills_entries_in_order(model):
    llm = LLM(model, num_kv_blocks=128, block_size=4, max_num_batched_tokens=5)
    prompts = random_prompts(6, seed=32, low=10, high=30)
    check_all(model, llm, prompts, scoring_params(6))


def test_warm_prefix_cache_still_yields_every_entry(model):
    """A scoring request takes no prefix hits; a plain one still hits what it cached."""
    llm = LLM(model, num_kv_blocks=128, block_size=4)
    prompt = random_prompts(1, seed=33, low=22, high=23)[0]
    plain = SamplingParams(max_tokens=2, halt_threshold=0.2, **GREEDY)
    scoring = SamplingParams(max_tokens=2, halt_threshold=0.2, prompt_logprobs=2, **GREEDY)
    llm.generate([prompt], plain)  # warms the cache
    out = check_all(model, llm, [prompt], [scoring])[0]
    assert out.num_cached_tokens == 0
    again = check_all(model, llm, [prompt, prompt], [scoring, scoring])  # twice, same step
    assert all(o.num_cached_tokens == 0 for o in again)
    assert llm.generate([prompt], plain)[0].num_cached_tokens >= 20


@pytest.mark.parametrize("batched_tokens", [256, 6])
def test_preemption_recomputes_the_prompt_without_duplicates(model, batched_tokens):
    llm = LLM(model, num_kv_blocks=14, block_size=4, max_num_batched_tokens=batched_tokens)
    prompts = random_prompts(8, seed=34, low=5, high=20)
    outputs = check_all(model, llm, prompts, scoring_params(8, max_tokens=10))
    assert llm.engine.scheduler.num_preemptions > 0
    assert any(o.metrics["num_preemptions"] > 0 for o in outputs)


def test_n_choices_share_the_prompt_logprobs(model):
    llm = LLM(model, num_kv_blocks=128, block_size=4)
    prompt = random_prompts(1, seed=35, low=14, high=15)[0]
    params = SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=5, prompt_logprobs=3,
                            ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    assert len(out.outputs) == 3 and all(len(o.token_ids) == 4 for o in out.outputs)
    check_prompt_logprobs(model, llm, prompt, params, out)
    llm.engine.block_manager.check_integrity()


@pytest.mark.parametrize("n", [1, 2])
def test_max_tokens_zero_scores_the_prompt_only(model, n):
    llm = LLM(model, num_kv_blocks=128, block_size=4, max_num_batched_tokens=8)
    prompts = random_prompts(3, seed=36, low=6, high=25)
    params = [SamplingParams(max_tokens=0, n=n, prompt_logprobs=1, halt_threshold=t)
              for t in (None, 0.3, 0.0)]
    outputs = llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, outputs, strict=True):
        check_prompt_logprobs(model, llm, prompt, p, out)
        assert [o.index for o in out.outputs] == list(range(n))
        assert all(o.token_ids == [] and o.text == "" and o.finish_reason == "length"
                   for o in out.outputs)
        assert out.finished and out.compute.flops > 0
    assert llm.engine.block_manager.usage() == 0.0


def test_max_tokens_zero_without_prompt_logprobs_is_refused(model):
    llm = LLM(model, num_kv_blocks=64)
    with pytest.raises(InvalidRequestError, match="max_tokens") as info:
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=0))
    assert info.value.param == "max_tokens"


def test_prompt_logprobs_come_once_with_the_first_delta(model):
    engine = LLM(model, num_kv_blocks=64, block_size=4, max_num_batched_tokens=4).engine
    prompt = random_prompts(1, seed=37, low=13, high=14)[0]
    request_id = engine.add_request(engine.prepare(
        prompt, SamplingParams(max_tokens=5, prompt_logprobs=0, **GREEDY)))
    deltas = []
    while engine.has_unfinished():
        deltas += [d for d in engine.step() if d.request_id == request_id]
    assert deltas[0].prompt_logprobs is not None and len(deltas[0].prompt_logprobs) == 13
    assert all(d.prompt_logprobs is None for d in deltas[1:])
    assert deltas[0].token_ids  # the first delta also carries the first token


def test_one_token_prompt_and_unscored_requests(model):
    llm = LLM(model, num_kv_blocks=64, block_size=4)
    one, plain = llm.generate([[5], [1, 2, 3]], [
        SamplingParams(max_tokens=2, prompt_logprobs=4, **GREEDY),
        SamplingParams(max_tokens=2, **GREEDY)])
    assert one.prompt_logprobs == [None]
    assert plain.prompt_logprobs is None


def test_scored_rows_are_counted_as_lm_head_compute(model):
    llm = LLM(model, num_kv_blocks=64, block_size=4, enable_prefix_caching=False)
    prompt = random_prompts(1, seed=38, low=12, high=13)[0]
    plain = llm.generate([prompt], SamplingParams(max_tokens=2, **GREEDY))[0]
    scored = llm.generate([prompt], SamplingParams(max_tokens=2, prompt_logprobs=0,
                                                   **GREEDY))[0]
    head = llm.engine.flop_table.head
    extra = scored.compute.flops - plain.compute.flops
    assert extra == pytest.approx(head * (len(prompt) - 1), abs=2)


def test_prompt_and_sampled_logprobs_carry_the_tokens_rank(model):
    llm = LLM(model, num_kv_blocks=64, block_size=4)
    prompt = random_prompts(1, seed=31, low=12, high=13)[0]
    params = SamplingParams(max_tokens=3, prompt_logprobs=2, logprobs=1, **GREEDY)
    out = llm.generate([prompt], params)[0]
    reference = reference_logprobs(model, llm, prompt, params).cpu()
    for position, entry in enumerate(out.prompt_logprobs[1:], start=1):
        row = reference[position - 1]
        assert entry.rank == int((row > row[prompt[position]]).sum()) + 1
    assert all(e.rank == 1 for e in out.logprobs)  # greedy tokens are the most likely
