"""The fused chains of the masked loop step (`engine/fused_chains.py`): their arithmetic,
eagerly and compiled, equals the reference forward (greedy tokens identical, logits within
1e-4 in fp32), alone and mixed with the compacted form; compiled, a masked decode step
launches at most 30 kernels per (layer, loop step) and still syncs once; and the op
counter sees compiled code's launches."""

from __future__ import annotations

import shutil

import pytest
import torch

from benchmarks.op_counts import OpCounter
from engine.errors import ConfigError
from engine.fused_chains import CompiledChains, count_launches
from engine.fused_step import FusedLayer
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.helpers import (
    GREEDY,
    LogitRecorder,
    check_against_reference,
    count_a_decode_step,
    make_model,
    mixed_params,
    random_prompts,
)
from tests.test_loop_forms import FORMS


@pytest.fixture(scope="module")
def model():
    return make_model(seed=3)


def eager_chains(llm: LLM, form: str = "masked") -> LLM:
    """The engine's masked steps through the chain functions, not compiled."""
    runner = llm.engine.runner
    runner.fused = [FusedLayer(block, None) for block in runner.blocks]
    runner.policy.form = FORMS[form]
    return llm


@pytest.mark.parametrize("form", ["masked", "random"])
def test_the_chains_equal_the_reference_alone_and_mixed_with_compaction(model, form):
    llm = eager_chains(LLM(model, block_size=4, num_kv_blocks=128), form)
    check_against_reference(model, llm, random_prompts(8, seed=1), mixed_params(8),
                            LogitRecorder(llm))


def test_the_chains_through_chunked_prefill_preemption_and_prefix_hits(model):
    llm = eager_chains(LLM(model, block_size=4, num_kv_blocks=16, max_num_batched_tokens=7))
    check_against_reference(model, llm, random_prompts(6, seed=2, low=8, high=24),
                            mixed_params(6, max_tokens=8), LogitRecorder(llm))
    assert llm.engine.scheduler.num_preemptions > 0
    shared = random_prompts(1, seed=4, low=21, high=22)[0]
    hits = eager_chains(LLM(model, block_size=4, num_kv_blocks=128))
    params = [SamplingParams(max_tokens=5, halt_threshold=0.2, **GREEDY)] * 3
    check_against_reference(model, hits, [shared + [i, 2] for i in range(3)], params)
    assert hits.engine.block_manager.prefix_hits > 0


@pytest.mark.parametrize("local, shared", [(8, 0), (0, 8), (0, 0)])
def test_the_chains_with_one_memory_bank_or_none(local, shared):
    model = make_model(seed=1, local_memory_slots=local, global_memory_slots=shared)
    llm = eager_chains(LLM(model, block_size=4, num_kv_blocks=64))
    check_against_reference(model, llm, random_prompts(3, seed=1), mixed_params(3),
                            LogitRecorder(llm))


def test_a_one_loop_model_through_the_chains():
    model = make_model(seed=2, max_loops=1)
    llm = eager_chains(LLM(model, block_size=4, num_kv_blocks=64))
    check_against_reference(model, llm, random_prompts(3, seed=3),
                            [SamplingParams(max_tokens=4, **GREEDY)] * 3, LogitRecorder(llm))


def test_compile_chains_must_be_a_bool():
    with pytest.raises(ConfigError, match="compile_chains must be true or false"):
        LLM(make_model(), compile_chains="yes")


def test_compile_chains_without_a_compiler_says_so_at_start_up(monkeypatch):
    monkeypatch.setattr("engine.fused_chains.shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match="needs a C/C.. compiler"):
        LLM(make_model(), compile_chains=True)


def test_a_compile_failure_at_start_up_is_a_config_error_naming_the_flag(monkeypatch):
    def broken(self):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr("engine.runner.ModelRunner._warm_up_chains", broken)
    with pytest.raises(ConfigError, match="inductor exploded.*without --compile-chains"):
        LLM(make_model(), compile_chains=True)


# ------------------------------------------------------------------ compiled (slow: compiles)
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler")


@pytest.fixture(scope="module")
def compiled_llm(model):
    """One compiled engine for the tests below (start-up compiles every chain variant)."""
    return LLM(model, block_size=4, num_kv_blocks=128, loop_form="masked",
               compile_chains=True)


@needs_compiler
def test_compiled_chains_equal_the_reference(model, compiled_llm):
    check_against_reference(model, compiled_llm, random_prompts(8, seed=1), mixed_params(8),
                            LogitRecorder(compiled_llm))
    mixed = compiled_llm.engine.runner.policy
    mixed.form, masked = FORMS["random"], mixed.form
    try:
        check_against_reference(model, compiled_llm, random_prompts(6, seed=5),
                                mixed_params(6), LogitRecorder(compiled_llm))
    finally:
        mixed.form = masked


@needs_compiler
def test_compiled_chains_in_static_decode_buckets_equal_eager(model):
    prompts = random_prompts(7, seed=12, low=3, high=30)
    params = [SamplingParams(max_tokens=3 + 4 * (i % 3), halt_threshold=[None, 0.3, 0.0][i % 3],
                             max_loops=[None, 2][i % 2], **GREEDY) for i in range(7)]
    eager = LLM(model, num_kv_blocks=128, block_size=4, max_num_seqs=8, static_decode="off")
    compiled = LLM(model, num_kv_blocks=128, block_size=4, max_num_seqs=8, static_decode="on",
                   max_num_batched_tokens=16, compile_chains=True)
    expected = [o.token_ids for o in eager.generate(prompts, params)]
    assert [o.token_ids for o in compiled.generate(prompts, params)] == expected
    assert compiled.engine.runner.static.replays > 0


@needs_compiler
def test_a_compiled_masked_decode_step_launches_at_most_30_kernels_per_loop_step(
        model, compiled_llm):
    counter, in_layers = count_a_decode_step(compiled_llm, random_prompts(6, seed=8))
    calls = model.config.n_layers * model.config.max_loops
    assert counter.syncs == 1 and counter.uploads == 1, counter.syncs_by_site
    assert sum(c.syncs for c in in_layers) == 0
    assert all(c.by_op["inductor.fused"] > 0 for c in in_layers)  # compiled, not traced
    assert sum(c.kernels for c in in_layers) / calls <= 30, in_layers[0].by_op
    while compiled_llm.engine.has_unfinished():
        compiled_llm.engine.step()


@needs_compiler
def test_nested_counters_both_count_compiled_launches_not_traced_ops():
    fn = CompiledChains._wrap(lambda t: (t * 2.0).sin() + 1.0)
    x = torch.randn(4, 8)
    fn(x)  # compiles
    reports: list[list[str]] = []
    with count_launches(reports.append), OpCounter() as outer, OpCounter() as inner:
        out = fn(x)
    torch.testing.assert_close(out, (x * 2.0).sin() + 1.0)
    assert len(reports) == 1 and reports[0]  # the fused kernel, seen by the profiler
    for counter in (outer, inner):
        assert counter.kernels == len(reports[0]) and counter.syncs == 0
        assert set(counter.by_op) == {"inductor.fused"}, counter.by_op  # no aten.mul/sin
