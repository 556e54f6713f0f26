"""The in-place decode backends (`--attention-backend flex` and `triton`) through the whole
engine: greedy tokens identical to the reference forward and logits within 1e-4 (fp32) in
every loop form, through chunked prefill, preemption, prefix hits and the static decode
buckets, and a masked decode step with no host sync of its own. Each backend's own
kernel tests are in tests/test_flex_paged.py and tests/test_triton_paged.py."""

from __future__ import annotations

import importlib.util
import shutil

import pytest

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

NO_COMPILER = not any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
BACKENDS = [
    pytest.param("flex", marks=pytest.mark.skipif(
        NO_COMPILER, reason="torch.compile on CPU needs a C++ compiler")),
    pytest.param("triton", marks=pytest.mark.skipif(
        importlib.util.find_spec("triton") is None, reason="needs the triton package")),
]


@pytest.fixture(scope="module")
def model():
    return make_model(seed=3)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(scope="module")
def llm(model, backend):
    return LLM(model, block_size=4, num_kv_blocks=128, attention_backend=backend)


@pytest.mark.parametrize("form", ["masked", "compacted", "random"])
def test_decodes_equal_the_reference_in_every_loop_form(model, llm, form):
    policy = llm.engine.runner.policy
    policy.form, chosen = FORMS[form], policy.form
    try:
        check_against_reference(model, llm, random_prompts(8, seed=1), mixed_params(8),
                                LogitRecorder(llm))
    finally:
        policy.form = chosen


def test_through_chunked_prefill_preemption_and_prefix_hits(model, llm, backend):
    small = LLM(model, block_size=4, num_kv_blocks=16, max_num_batched_tokens=7,
                attention_backend=backend)
    check_against_reference(model, small, random_prompts(6, seed=2, low=8, high=24),
                            mixed_params(6, max_tokens=8), LogitRecorder(small))
    assert small.engine.scheduler.num_preemptions > 0
    shared = random_prompts(1, seed=4, low=21, high=22)[0]
    params = [SamplingParams(max_tokens=5, halt_threshold=0.2, **GREEDY)] * 3
    check_against_reference(model, llm, [shared + [i, 2] for i in range(3)], params)
    assert llm.engine.block_manager.prefix_hits > 0


def test_static_decode_buckets_equal_gather(model, backend):
    prompts = random_prompts(7, seed=12, low=3, high=30)
    params = [SamplingParams(max_tokens=3 + 4 * (i % 3), halt_threshold=[None, 0.3, 0.0][i % 3],
                             max_loops=[None, 2][i % 2], **GREEDY) for i in range(7)]
    gather = LLM(model, num_kv_blocks=128, block_size=4, max_num_seqs=8, static_decode="off")
    in_place = LLM(model, num_kv_blocks=128, block_size=4, max_num_seqs=8,
                   static_decode="on", max_num_batched_tokens=16, attention_backend=backend)
    expected = [o.token_ids for o in gather.generate(prompts, params)]
    assert [o.token_ids for o in in_place.generate(prompts, params)] == expected
    assert in_place.engine.runner.static.replays > 0


def test_a_masked_decode_step_still_syncs_once(model, llm, backend):
    policy = llm.engine.runner.policy
    policy.form, chosen = FORMS["masked"], policy.form
    try:
        counter, in_layers = count_a_decode_step(llm, random_prompts(6, seed=8))
        while llm.engine.has_unfinished():
            llm.engine.step()
    finally:
        policy.form = chosen
    assert counter.syncs == 1 and counter.uploads == 1, counter.syncs_by_site
    assert sum(c.syncs for c in in_layers) == 0
    if backend == "triton":  # one launch a (layer, step), and no gather or SDPA left
        launches = sum(c.by_op["triton.paged_decode"] for c in in_layers)
        assert launches == len(in_layers) * model.config.max_loops
        assert not any(c.by_op["aten.index_select"] or c.by_op[
            "aten._scaled_dot_product_flash_attention_for_cpu"] for c in in_layers)
