"""Liveness of the scheduler and KV contract: what once hung finishes, n choices compute
their prompt once, and a seeded stress run over tiny pools (shared prefixes, n > 1,
aborts, preemption, chunked prefill) finishes every request within a bound, keeps the pool
consistent after every step, and matches a roomy pool and the reference forward."""

from __future__ import annotations

import random

import pytest

from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.helpers import GREEDY, make_model, random_prompts, reference_greedy


@pytest.fixture(scope="module")
def model():
    return make_model(seed=3)


class TokenCounter:
    """Counts the tokens the runner is given (what the model actually computes)."""

    def __init__(self, llm: LLM) -> None:
        self.tokens = 0
        self._run = llm.engine.runner.run
        llm.engine.runner.run = self

    def __call__(self, step):
        self.tokens += len(step.token_ids)
        return self._run(step)


def run_to_completion(engine: LLMEngine, max_steps: int, abort_at: dict[int, str] | None = None
                      ) -> tuple[dict[str, dict[int, list[int]]], int]:
    """Step until idle, checking the pool after every step; tokens per request and choice."""
    tokens: dict[str, dict[int, list[int]]] = {}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        assert steps <= max_steps, f"no completion within {max_steps} steps"
        if abort_at and steps in abort_at:
            engine.abort_request(abort_at[steps])
        for delta in engine.step():
            for piece in delta.outputs:
                tokens.setdefault(delta.request_id, {}).setdefault(piece.index, []).extend(
                    piece.token_ids)
        engine.block_manager.check_integrity()
    assert engine.block_manager.usage() == 0.0
    return tokens, steps


def test_a_cached_prefix_under_kv_pressure_does_not_livelock(model):
    """C is served (its two full blocks stay cached), then A and B = C + 1 arrive together
    on a 6-block pool: B's lookup must not hold C's blocks while it cannot be allocated."""
    llm = LLM(model, num_kv_blocks=6, block_size=4)
    c = random_prompts(1, seed=20, low=8, high=9)[0]
    a = random_prompts(1, seed=21, low=16, high=17)[0]
    params = SamplingParams(max_tokens=4, **GREEDY)
    llm.generate([c], params)
    engine = llm.engine
    for prompt in (a, c + [7]):
        engine.add_request(engine.prepare(prompt, params))
    outputs, steps = run_to_completion(engine, max_steps=60)
    assert len(outputs) == 2 and steps < 60
    for prompt, out in zip((a, c + [7]), outputs.values(), strict=True):
        expected, _ = reference_greedy(model, prompt, 4, model.config.halt_threshold, None)
        assert out[0] == expected


def test_n_choices_compute_the_prompt_once_and_equal_separate_seeded_requests(model):
    prompt = random_prompts(1, seed=22, low=41, high=42)[0]  # a partial last block
    llm = LLM(model, num_kv_blocks=128, block_size=4)
    counter = TokenCounter(llm)
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=1234, n=4, ignore_eos=True)
    together = llm.generate([prompt], params)[0]
    # 41 prompt tokens once, then each choice decodes its 5 tokens after the first
    assert counter.tokens == 41 + 4 * 5
    alone = LLM(model, num_kv_blocks=128, block_size=4, enable_prefix_caching=False)
    separate = alone.generate([prompt] * 4, [
        SamplingParams(max_tokens=6, temperature=0.9, seed=1234 + i, ignore_eos=True)
        for i in range(4)])
    assert [c.token_ids for c in together.outputs] == [o.token_ids for o in separate]
    assert len({tuple(c.token_ids) for c in together.outputs}) > 1  # they really differ
    assert together.compute.flops < sum(o.compute.flops for o in separate)


def test_n_choices_fork_without_prefix_caching_and_under_pressure(model):
    prompt = random_prompts(1, seed=23, low=18, high=19)[0]
    params = SamplingParams(max_tokens=8, n=3, **GREEDY)
    expected, _ = reference_greedy(model, prompt, 8, model.config.halt_threshold, None)
    for options in ({"enable_prefix_caching": False}, {"num_kv_blocks": 9}):
        llm = LLM(model, block_size=4, **{"num_kv_blocks": 64, **options})
        out = llm.generate([prompt], params)[0]
        assert [c.token_ids for c in out.outputs] == [expected] * 3
        llm.engine.block_manager.check_integrity()


def test_requests_sharing_a_prefix_in_one_step_compute_it_once(model):
    shared = random_prompts(1, seed=24, low=24, high=25)[0]
    prompts = [shared + [i] for i in range(4)]
    llm = LLM(model, num_kv_blocks=128, block_size=4)
    counter = TokenCounter(llm)
    outs = llm.generate(prompts, SamplingParams(max_tokens=3, **GREEDY))
    # the first computes 25 tokens; the others hit its 6 full blocks and compute 1 each
    assert counter.tokens == 25 + 3 * 1 + 4 * 2
    for prompt, out in zip(prompts, outs, strict=True):
        expected, _ = reference_greedy(model, prompt, 3, model.config.halt_threshold, None)
        assert out.token_ids == expected


def stress_workload(rng: random.Random) -> list[tuple[list[int], SamplingParams]]:
    prefixes = random_prompts(3, seed=rng.randrange(10**6), low=4, high=14)
    work = []
    for _ in range(rng.randint(6, 10)):
        tail = [rng.randrange(256) for _ in range(rng.randint(1, 8))]
        prompt = rng.choice(prefixes) + tail if rng.random() < 0.7 else tail * 2
        sampled = rng.random() < 0.4
        params = SamplingParams(
            max_tokens=rng.randint(1, 10), n=rng.choice([1, 1, 2, 3]), ignore_eos=True,
            temperature=0.8 if sampled else 0.0, seed=rng.randrange(1000) if sampled else None,
            halt_threshold=rng.choice([None, 0.0, 0.3]), max_loops=rng.choice([None, 1, 3]))
        work.append((prompt, params))
    return work


@pytest.mark.parametrize("seed", range(6))
def test_stress_tiny_pools_finish_stay_consistent_and_match_a_roomy_pool(model, seed):
    rng = random.Random(seed)
    work = stress_workload(rng)
    options = dict(block_size=rng.choice([2, 4]), max_num_batched_tokens=rng.choice([6, 16]),
                   max_num_seqs=rng.choice([3, 8]))
    need = max(-(-(len(p) + sp.max_tokens) // options["block_size"]) for p, sp in work)
    tiny = LLM(model, num_kv_blocks=need + rng.randint(0, 3), **options)
    engine = tiny.engine
    ids = [engine.add_request(engine.prepare(p, sp)) for p, sp in work]
    aborted = {rng.randint(2, 12): rng.choice(ids) for _ in range(2)}
    total = sum(len(p) + sp.n * sp.max_tokens for p, sp in work)
    outputs, _ = run_to_completion(engine, max_steps=4 * total + 50, abort_at=aborted)
    assert set(outputs) | set(aborted.values()) >= set(ids) - set(aborted.values())
    roomy = LLM(model, num_kv_blocks=512, block_size=4).generate(
        [p for p, _ in work], [sp for _, sp in work])
    for request_id, (prompt, params), expected in zip(ids, work, roomy, strict=True):
        if request_id in aborted.values():
            continue
        got = [outputs[request_id][i] for i in range(params.n)]
        assert got == [c.token_ids for c in expected.outputs], f"request {request_id}"
        if params.temperature == 0.0 and params.n == 1:
            threshold = (model.config.halt_threshold if params.halt_threshold is None
                         else params.halt_threshold)
            reference, _ = reference_greedy(model, prompt, params.max_tokens, threshold,
                                            params.max_loops)
            assert got[0] == reference
