"""The engine against the reference forward: greedy tokens and logits, in every batching
situation (mixed lengths and per-request compute knobs, chunked prefill, preemption,
prefix-cache hits, batch invariance), with the block integrity check after each scenario."""

from __future__ import annotations

import pytest
import torch

from engine import InvalidRequestError
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.helpers import (
    GREEDY,
    LogitRecorder,
    check_against_reference,
    make_model,
    mixed_params,
    random_prompts,
)


@pytest.fixture(scope="module")
def model():
    return make_model(seed=3)


def test_mixed_batch_equals_reference_tokens_and_logits(model):
    llm = LLM(model, num_kv_blocks=128, block_size=4)
    recorder = LogitRecorder(llm)
    prompts = random_prompts(10, seed=1)
    check_against_reference(model, llm, prompts, mixed_params(10), recorder)


def test_chunked_prefill_equals_reference(model):
    llm = LLM(model, num_kv_blocks=128, block_size=4, max_num_batched_tokens=7)
    recorder = LogitRecorder(llm)
    prompts = random_prompts(6, seed=2, low=10, high=30)
    check_against_reference(model, llm, prompts, mixed_params(6), recorder)


def test_preemption_by_a_tiny_pool_equals_reference(model):
    llm = LLM(model, num_kv_blocks=14, block_size=4)
    prompts = random_prompts(8, seed=3, low=5, high=20)
    check_against_reference(model, llm, prompts, mixed_params(8, max_tokens=10))
    assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_equal_reference(model):
    llm = LLM(model, num_kv_blocks=128, block_size=4)
    shared = random_prompts(1, seed=4, low=21, high=22)[0]
    prompts = [shared + [i, i + 1] for i in range(5)]
    params = [SamplingParams(max_tokens=5, halt_threshold=0.2, **GREEDY)] * 5
    check_against_reference(model, llm, prompts[:1], params[:1])
    check_against_reference(model, llm, prompts[1:], params[1:])
    manager = llm.engine.block_manager
    assert manager.prefix_hits >= 4 * 20
    # a different halt_threshold must not hit the blocks cached under another one
    hits = manager.prefix_hits
    other = [SamplingParams(max_tokens=3, halt_threshold=0.4, **GREEDY)]
    check_against_reference(model, llm, [shared + [9]], other)
    assert manager.prefix_hits == hits


def test_max_depth_mode_equals_exact_reference(model):
    llm = LLM(model, num_kv_blocks=64, block_size=4, mode="max_depth")
    prompts = random_prompts(4, seed=5)
    params = [SamplingParams(max_tokens=4, **GREEDY)] * 4
    check_against_reference(model, llm, prompts, params)
    outs = llm.generate(prompts, params)
    assert all(o.compute.compute_saved == 0.0 for o in outs)
    assert all(o.compute.mean_loops_per_token == model.config.max_loops for o in outs)


def test_batch_invariance(model):
    llm = LLM(model, num_kv_blocks=256, block_size=4)
    target = random_prompts(1, seed=6)[0]
    params = SamplingParams(max_tokens=8, halt_threshold=0.3, **GREEDY)
    alone = llm.generate([target], params)[0].token_ids
    others = random_prompts(16, seed=7)
    batch = llm.generate(others[:8] + [target] + others[8:], params)
    assert batch[8].token_ids == alone
    llm.engine.block_manager.check_integrity()


def test_compute_statistics(model):
    llm = LLM(model, num_kv_blocks=64, block_size=4, enable_prefix_caching=False)
    prompt = random_prompts(1, seed=8)[0]
    fast = llm.generate([prompt], SamplingParams(max_tokens=4, max_loops=1, **GREEDY))[0]
    assert fast.compute.loops_per_layer == [1.0] * model.config.n_layers
    assert fast.compute.compute_saved > 0.5
    full = llm.generate([prompt], SamplingParams(max_tokens=4, halt_threshold=0.0,
                                                 **GREEDY))[0]
    assert full.compute.compute_saved == pytest.approx(0.0, abs=1e-12)
    assert full.compute.flops == full.compute.flops_max_depth
    assert fast.compute.flops_max_depth == full.compute.flops_max_depth
    gates = full.compute.memory_gate_per_layer
    assert len(gates) == model.config.n_layers and all(0 < g < 1 for g in gates)


def test_abort_frees_blocks(model):
    llm = LLM(model, num_kv_blocks=64, block_size=4)
    engine = llm.engine
    ids = [engine.add_request(engine.prepare(p, SamplingParams(max_tokens=20, **GREEDY)))
           for p in random_prompts(4, seed=9)]
    engine.step()
    engine.step()
    final = engine.abort_request(ids[1])
    assert final.finished and final.finish_reason == "abort"
    engine.abort_request(ids[3])
    engine.block_manager.check_integrity()
    while engine.has_unfinished():
        engine.step()
    engine.block_manager.check_integrity()
    assert engine.block_manager.usage() == 0.0
    assert engine.abort_request(ids[0]) is None  # already finished: nothing to do


@pytest.mark.parametrize("prompt, params, param", [
    ([], SamplingParams(), "prompt"),
    ("", SamplingParams(), "prompt"),
    ([1, 2, 999], SamplingParams(), "prompt"),
    ([1, 2, 3], SamplingParams(max_tokens=300), "max_tokens"),
    ([1, 2, 3], SamplingParams(max_loops=4), "max_loops"),
    ([1, 2, 3], SamplingParams(stop_token_ids=[300]), "stop_token_ids"),
])
def test_bad_requests_raise_typed_errors(model, prompt, params, param):
    llm = LLM(model, num_kv_blocks=64)
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([prompt], params)
    assert info.value.param == param
    assert not llm.engine.has_unfinished()


def test_bf16_engine_runs_and_keeps_blocks_consistent(tmp_path):
    from engine import save_model

    save_model(make_model(seed=3), tmp_path)
    llm = LLM(tmp_path, device="cpu", dtype="bf16", num_kv_blocks=64, block_size=4)
    assert llm.engine.model.dtype == torch.bfloat16
    assert llm.engine.runner.kv_caches[0].dtype == torch.bfloat16
    outs = llm.generate(random_prompts(3, seed=10), mixed_params(3))
    assert all(len(o.token_ids) == 6 for o in outs)
    assert all(0.0 <= o.compute.compute_saved < 1.0 for o in outs)
    llm.engine.block_manager.check_integrity()


@pytest.mark.parametrize("form", ["masked", "compacted"])
def test_a_bf16_engine_is_as_close_to_fp32_as_the_bf16_reference(form):
    """The serving arithmetic in bf16 (fp32 norms, rotations and ACT sums; bf16 rounding
    where the reference rounds elsewhere) loses no more than the reference does: each
    prompt's next-token logits are within twice the bf16 reference's own error from the
    fp32 reference (measured 0.002-0.004 for both, logits of size 0.5)."""
    import copy

    from tests.helpers import LogitRecorder
    from tests.test_loop_forms import FORMS

    model = make_model(seed=3)
    half = copy.deepcopy(model).to(torch.bfloat16)
    llm = LLM(half, block_size=4, num_kv_blocks=256)
    llm.engine.runner.policy.form = FORMS[form]
    recorder = LogitRecorder(llm)
    prompts = random_prompts(8, seed=1)
    outs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0))
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt])
        want = model.reference_forward(ids).logits[0, -1]
        own_error = (half.reference_forward(ids).logits[0, -1].float() - want).abs().max()
        error = (recorder.by_parent[out.request_id][0].float() - want).abs().max()
        assert error <= 2 * own_error + 1e-3, (float(error), float(own_error))


def test_engine_config_errors_name_the_fix(model):
    from engine import ConfigError

    with pytest.raises(ConfigError, match="max_num_batched_tokens .* must be at least"):
        LLM(model, enable_chunked_prefill=False, max_num_batched_tokens=64)
    with pytest.raises(ConfigError, match="mode must be one of"):
        LLM(model, mode="fast")


@pytest.mark.parametrize("lengths,calls", [
    ((20, 22, 24, 21, 23, 20), {"padded": 1, "alone": 0}),
    ((40, 4, 4), {"padded": 1, "alone": 1}),
    ((40, 38, 5, 4, 6, 3), {"padded": 2, "alone": 0})])
def test_grouped_and_lone_prefill_attention_equal_reference(model, lengths, calls,
                                                           monkeypatch):
    """Prompts of similar lengths share one padded call; a group grows while its padding
    at most doubles its work (with BOS, 41 and 5 tokens share one, a third chunk of 5 is
    left alone); every mix must match the reference. The prefill step's first (layer,
    loop step) makes the calls given (every token loops there)."""
    from engine.paged_attention import AttentionPlan

    used = {"padded": [], "alone": []}
    padded, single = AttentionPlan._attend_group, AttentionPlan._attend_prefill

    def count(name, real):
        def wrapper(*args, **kwargs):
            used[name].append(1)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(AttentionPlan, "_attend_group", count("padded", padded))
    monkeypatch.setattr(AttentionPlan, "_attend_prefill", count("alone", single))
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    llm = LLM(model, num_kv_blocks=128, block_size=4, max_num_batched_tokens=1024)
    first_call = {}
    real_attend = AttentionPlan.attend

    def attend(self, *args, **kwargs):
        before = {k: len(v) for k, v in used.items()}
        result = real_attend(self, *args, **kwargs)
        first_call.setdefault("made", {k: len(v) - before[k] for k, v in used.items()})
        return result

    monkeypatch.setattr(AttentionPlan, "attend", attend)
    recorder = LogitRecorder(llm)
    check_against_reference(model, llm, prompts, mixed_params(len(prompts), max_tokens=4),
                            recorder)
    assert first_call["made"] == calls
