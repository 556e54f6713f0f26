"""Both forms of a (layer, loop step), and every mix of them, equal the reference forward:
greedy tokens identical and logits within 1e-4 (fp32 CPU), for mixed batches with
per-request thresholds and max_loops, chunked prefill, preemption and prefix-cache hits.
Also the cost model's choices and the host syncs of a masked decode step."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from engine.form_policy import COMPACTED, MASKED, CostModel, FormPolicy
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


@pytest.fixture(scope="module")
def model():
    return make_model(seed=3)


def seeded_mix(seed: int):
    """A policy that picks a form at random for every (layer, step) call."""
    rng = random.Random(seed)
    return lambda layer, step, total: rng.choice((MASKED, COMPACTED))


FORMS = {
    "masked": lambda layer, step, total: MASKED,
    "compacted": lambda layer, step, total: COMPACTED,
    "alternating": lambda layer, step, total: (MASKED, COMPACTED)[(layer + step) % 2],
    "random": seeded_mix(7),
}


def engine_with(model, form: str, **options) -> LLM:
    llm = LLM(model, block_size=4, loop_form="masked", **options)
    llm.engine.runner.policy.form = FORMS[form]
    return llm


@pytest.mark.parametrize("form", list(FORMS))
def test_mixed_batch_in_every_form(model, form):
    llm = engine_with(model, form, num_kv_blocks=128)
    recorder = LogitRecorder(llm)
    check_against_reference(model, llm, random_prompts(8, seed=1), mixed_params(8), recorder)


@pytest.mark.parametrize("form", list(FORMS))
def test_chunked_prefill_and_preemption_in_every_form(model, form):
    llm = engine_with(model, form, num_kv_blocks=16, max_num_batched_tokens=7)
    recorder = LogitRecorder(llm)
    prompts = random_prompts(6, seed=2, low=8, high=24)
    check_against_reference(model, llm, prompts, mixed_params(6, max_tokens=8), recorder)
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("form", ["masked", "random"])
def test_prefix_hits_in_every_form(model, form):
    llm = engine_with(model, form, num_kv_blocks=128)
    shared = random_prompts(1, seed=4, low=21, high=22)[0]
    params = [SamplingParams(max_tokens=5, halt_threshold=0.2, **GREEDY)] * 4
    check_against_reference(model, llm, [shared + [1]], params[:1])
    check_against_reference(model, llm, [shared + [i, 2] for i in range(3)], params[1:])
    assert llm.engine.block_manager.prefix_hits > 0


@pytest.mark.parametrize("threshold, router_bias, gathers, later_steps", [
    (0.0, None, False, True),  # no token halts early: every row still loops, no gathers
    (0.5, 12.0, False, False),  # lam_1 ~ 1: every token halts at step 1, later steps fill
    (0.2, None, True, True),  # some halt: the active rows are gathered
])
def test_a_compacted_step_gathers_only_a_proper_subset(model, monkeypatch, threshold,
                                                       router_bias, gathers, later_steps):
    """Once the compacted form has paid its sync for the active count, a step with every
    row active runs the masked form (no gathers) and one with none runs no dense work;
    both stay exact (later tokens read the planes the empty steps filled)."""
    import engine.runner as runner_module

    if router_bias is not None:
        model = make_model(seed=3)
        with torch.no_grad():
            for block in model.layers:
                block.router.bias.fill_(router_bias)
    llm = engine_with(model, "compacted", num_kv_blocks=128)
    calls = {"compacted": 0, "masked": 0}
    compacted, masked = runner_module.compacted_step, llm.engine.runner._masked

    def count(name, fn):
        def counted(*args):
            calls[name] += 1
            return fn(*args)
        return counted

    monkeypatch.setattr(runner_module, "compacted_step", count("compacted", compacted))
    monkeypatch.setattr(llm.engine.runner, "_masked", count("masked", masked))
    params = [SamplingParams(max_tokens=6, halt_threshold=threshold, **GREEDY)] * 4
    check_against_reference(model, llm, random_prompts(4, seed=6), params, LogitRecorder(llm))
    assert (calls["compacted"] > 0) == gathers
    assert (calls["compacted"] + calls["masked"] > 0) == later_steps


def test_max_depth_in_the_masked_form(model):
    llm = engine_with(model, "masked", num_kv_blocks=64, mode="max_depth")
    check_against_reference(model, llm, random_prompts(3, seed=5),
                            [SamplingParams(max_tokens=4, **GREEDY)] * 3)


def test_the_cost_model_compacts_only_when_it_pays():
    # a row costs 1 ms and a compaction 3 ms: compaction pays once it saves 3+ rows
    costs = CostModel(rows=[1, 64], seconds=[0.001, 0.064], compaction_seconds=[0.003, 0.003])
    policy = FormPolicy(num_layers=1, max_loops=3, cost_model=costs)
    assert policy.form(0, 1, 64) == MASKED  # every token runs the first step
    assert policy.form(0, 2, 64) == MASKED  # nothing halted yet, as far as it knows
    policy.observe([[64, 16, 16]], total=64)
    policy.survival = [[1.0, 0.25, 0.25]]
    assert policy.form(0, 2, 64) == COMPACTED  # 48 rows saved
    assert policy.form(0, 2, 2) == MASKED  # 1.5 rows saved: less than a compaction
    # a GPU-like model: a step costs the same at any row count, the sync does not pay
    flat = CostModel(rows=[1, 256], seconds=[0.0001, 0.0001],
                     compaction_seconds=[0.00005, 0.00005])
    gpu = FormPolicy(num_layers=1, max_loops=3, cost_model=flat)
    gpu.survival = [[1.0, 0.1, 0.1]]
    assert gpu.form(0, 2, 256) == MASKED


def test_a_step_that_is_often_empty_is_compacted_even_at_batch_one():
    # a fixed 1 ms per step whatever its rows (a small batch): a fractional active count
    # would price the compacted form at nearly the whole step; an empty step costs nothing
    costs = CostModel(rows=[1, 64], seconds=[0.001, 0.001], compaction_seconds=[1e-4, 1e-4])
    policy = FormPolicy(num_layers=1, max_loops=3, cost_model=costs)
    policy.survival = [[1.0, 0.3, 0.3]]
    assert policy.form(0, 2, 1) == MASKED  # no empty step seen: 0.3 rows cost the full 1 ms
    for _ in range(20):  # twenty steps in a row had nobody left at step 2
        policy.observe([[1, 0, 0]], total=1)
    assert policy.empty[0][1] > 0.8 and policy.empty[0][0] == 0.0
    assert policy.form(0, 2, 1) == COMPACTED
    # the masked form's own merge ops count against it
    merging = CostModel(rows=[1, 64], seconds=[0.001, 0.064], compaction_seconds=[0.003, 0.003],
                        merge_seconds=[0.002, 0.002])
    policy = FormPolicy(num_layers=1, max_loops=3, cost_model=merging)
    policy.survival = [[1.0, 0.97, 0.97]]
    assert policy.form(0, 2, 64) == COMPACTED  # 1.9 rows (1.9 ms) saved + 2 ms of merges > 3 ms
    policy.cost_model = dataclasses.replace(merging, merge_seconds=None)
    assert policy.form(0, 2, 64) == MASKED  # without the merges, 1.9 ms saved < 3 ms
    assert merging.merge(32) == 0.002 and costs.merge(32) == 0.0


def test_calibration_times_every_term_of_the_cost_model(model):
    from engine.form_policy import calibrate

    costs = calibrate(model, max_rows=8)
    assert costs.rows == [1, 4, 8]
    for terms in (costs.seconds, costs.compaction_seconds, costs.merge_seconds):
        assert len(terms) == 3 and all(t > 0 for t in terms)
    assert costs.seconds == sorted(costs.seconds)  # fewer rows never cost more


def test_calibration_noise_never_makes_fewer_rows_dearer():
    from engine.form_policy import _monotone

    assert _monotone([3.0, 2.0, 2.5, 4.0, 3.5]) == [2.0, 2.0, 2.5, 3.5, 3.5]


def test_survival_is_learned_from_the_steps_seen(model):
    llm = LLM(model, num_kv_blocks=64, block_size=4)
    llm.generate(random_prompts(4, seed=6), SamplingParams(max_tokens=6, halt_threshold=0.3,
                                                           **GREEDY))
    survival = llm.engine.runner.policy.survival
    assert all(row[0] == 1.0 for row in survival)
    assert any(rate < 1.0 for row in survival for rate in row[1:])


def test_a_masked_decode_step_syncs_once_and_launches_few_kernels_per_loop_step(model):
    """The masked form has no data-dependent shape: the step uploads its inputs once and
    reads its results back once, however many (layer, step) calls it makes."""
    llm = engine_with(model, "masked", num_kv_blocks=128)
    counter, in_layers = count_a_decode_step(llm, random_prompts(6, seed=8))
    calls = model.config.n_layers * model.config.max_loops
    assert counter.syncs == 1 and counter.uploads == 1, counter.by_op
    assert sum(c.syncs for c in in_layers) == 0
    # 32.8 per (layer, step) in this fp32 model with the hand-fused serving block, eager
    # (47.0 before the addmm, one-gather and complex-RoPE fusions, 40.3 before the fresh
    # first step and the in-place bank softmaxes, 36.7 before k/v became a view of the
    # projection and step N lost its halting arithmetic, 33.7 before the step's one
    # attention mask, the unmerged state of halted rows and the shared step-1 depth; the
    # goal is 30, which the compiled chains meet: tests/test_fused_chains.py)
    assert sum(c.kernels for c in in_layers) / calls <= 33


def test_the_kv_pool_from_device_memory_names_the_flag_when_it_cannot_fit():
    from engine.errors import ConfigError
    from engine.kv_sizing import blocks_from_device_memory

    gib = 2**30
    # 0.9 of 100 GiB, less 5 GiB headroom and 20 GiB of weights: 65 GiB of 1 GiB blocks
    assert blocks_from_device_memory(100 * gib, 20 * gib, 0.9, gib) == 65
    with pytest.raises(ConfigError, match="raise --gpu-memory-utilization"):
        blocks_from_device_memory(100 * gib, 90 * gib, 0.9, gib)


@pytest.mark.parametrize("max_num_seqs", [3, 8])
def test_static_decode_buckets_equal_eager_as_batches_shrink_and_grow(model, max_num_seqs):
    """Fixed-shape decode buckets (CUDA graphs on a GPU; the same padded forward eagerly
    here): batches inside and outside the buckets, growing and shrinking between steps
    (requests of different lengths finish and arrive), give the eager engine's tokens."""
    prompts = random_prompts(7, seed=12, low=3, high=30)
    params = [SamplingParams(max_tokens=3 + 4 * (i % 3), halt_threshold=[None, 0.3, 0.0][i % 3],
                             max_loops=[None, 2][i % 2], **GREEDY) for i in range(7)]
    eager = LLM(model, num_kv_blocks=128, block_size=4, max_num_seqs=max_num_seqs,
                static_decode="off").generate(prompts, params)
    bucketed = LLM(model, num_kv_blocks=128, block_size=4, max_num_seqs=max_num_seqs,
                   static_decode="on", max_num_batched_tokens=16)
    outs = bucketed.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in eager]
    assert bucketed.engine.runner.static.replays > 0
    bucketed.engine.block_manager.check_integrity()


def test_static_decode_buckets_and_their_limits():
    from engine.static_decode import StaticDecode, powers_of_two

    assert powers_of_two(1) == [1] and powers_of_two(6) == [1, 2, 4, 6]
    static = StaticDecode(lambda inputs: None, max_rows=64, max_width=16, num_steps=3,
                          block_size=4, scratch_block=0, device=torch.device("cpu"),
                          capture=True)
    assert static.bucket(5, 3) == (8, 4) and static.bucket(64, 16) == (64, 16)
    assert static.bucket(65, 1) is None and static.bucket(1, 17) is None
    assert not static.capture  # no graphs off CUDA


@pytest.mark.parametrize("local, shared", [(8, 0), (0, 8), (0, 0)])
def test_serving_block_with_one_memory_bank_or_none(local, shared):
    """The serving block folds whichever banks exist (and none) exactly."""
    model = make_model(seed=1, local_memory_slots=local, global_memory_slots=shared)
    llm = LLM(model, num_kv_blocks=64, block_size=4)
    check_against_reference(model, llm, random_prompts(3, seed=1), mixed_params(3),
                            LogitRecorder(llm))


@pytest.mark.parametrize("local, shared", [(8, 8), (0, 0)])
@pytest.mark.parametrize("form", ["masked", "compacted"])
def test_a_one_loop_model_equals_the_reference(local, shared, form):
    """max_loops = 1 (a dense decoder, with or without memory): the masked form's one-loop
    state (the mixture is h_1, no halting arithmetic) and the compacted form, with
    chunked prefill, against the reference; every token reports depth 1 in every layer."""
    model = make_model(seed=4, max_loops=1, local_memory_slots=local,
                       global_memory_slots=shared)
    llm = engine_with(model, form, num_kv_blocks=64, max_num_batched_tokens=16)
    params = [SamplingParams(max_tokens=6, halt_threshold=t, max_loops=m, **GREEDY)
              for t, m in ((None, None), (0.5, 1), (0.0, None), (0.05, 1))]
    check_against_reference(model, llm, random_prompts(4, seed=2), params, LogitRecorder(llm))
    out = llm.generate(random_prompts(2, seed=5), SamplingParams(max_tokens=3, **GREEDY))
    for o in out:
        assert o.compute.loops_per_layer == [1.0] * model.config.n_layers


def test_a_one_loop_layer_launches_only_its_dense_work():
    """A dense decoder's layer: norms, projections, RoPE, the KV write, attention and the
    MLP; no halting arithmetic, no per-layer flags and no gates (25 kernels a layer
    before the one-loop state, 16 before the shared zero gates and attention mask; the
    first layer also makes the step's shared halted-row flags, zero gates and mask)."""
    model = make_model(seed=4, max_loops=1, local_memory_slots=0, global_memory_slots=0)
    llm = engine_with(model, "masked", num_kv_blocks=128)
    counter, in_layers = count_a_decode_step(llm, random_prompts(6, seed=8))
    assert counter.syncs == 1
    assert max(c.kernels for c in in_layers[1:]) <= 14  # 14 on a CPU with torch 2.13
    assert in_layers[0].kernels <= 14 + 3 + 1 + 2


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=20, **GREEDY),
    SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=3, logprobs=2,
                   ignore_eos=True)])
def test_a_whole_decode_step_reads_back_once(model, params):
    """Sampled ids, their logprobs, depths and gate means: one device-to-host copy."""
    from benchmarks.host_overhead import host_tensors
    from benchmarks.op_counts import OpCounter

    llm = engine_with(model, "masked", num_kv_blocks=128)
    engine = llm.engine
    for prompt in random_prompts(4, seed=9):
        engine.add_request(engine.prepare(prompt, params))
    engine.step()  # the prefill
    with OpCounter() as counter:
        counter.mark_host(*host_tensors(engine))  # the FLOP table lives on the host
        engine.step()
    assert counter.syncs == 1, counter.syncs_by_site
