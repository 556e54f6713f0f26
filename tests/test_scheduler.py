"""Scheduler: token budget, decode first, chunked prefill, FCFS, preemption of the newest."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.request import RequestStatus
from engine.scheduler import Scheduler
from tests.helpers import make_request


def make_scheduler(num_blocks=32, budget=16, max_seqs=8, chunked=True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4, enable_prefix_caching=False), max_seqs,
                     budget, chunked)


def run_step(scheduler: Scheduler):
    """Schedule, pretend to compute, and sample one token for finished prompts."""
    out = scheduler.schedule()
    scheduler.advance(out)
    for chunk in out.chunks:
        if chunk.samples:
            chunk.request.append_token(1)
    return out


def test_chunked_prefill_under_one_budget():
    s = make_scheduler(budget=16)
    a, b = make_request("a", 10), make_request("b", 10)
    s.add(a)
    s.add(b)
    out = run_step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [
        ("a", 0, 10), ("b", 0, 6)]
    out = run_step(s)  # a decodes first, then b's prompt continues
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [
        ("a", 10, 1), ("b", 6, 4)]
    assert [c.samples for c in out.chunks] == [True, True]
    s.blocks.check_integrity()


def test_without_chunked_prefill_a_prompt_waits_for_a_full_budget():
    s = make_scheduler(budget=16, chunked=False)
    s.add(make_request("a", 10))
    s.add(make_request("b", 10))
    out = run_step(s)
    assert [c.request.request_id for c in out.chunks] == ["a"]
    assert [r.request_id for r in s.waiting] == ["b"]


def test_max_num_seqs_and_fcfs():
    s = make_scheduler(budget=100, max_seqs=2)
    for name in "abc":
        s.add(make_request(name, 3))
    out = run_step(s)
    assert [c.request.request_id for c in out.chunks] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_preemption_takes_the_newest_and_it_resumes_first():
    s = make_scheduler(num_blocks=4, budget=64)
    a, b = make_request("a", 8), make_request("b", 7)
    s.add(a)
    s.add(b)
    run_step(s)  # a: 9 tokens (3 blocks needed next), b: 8 tokens (2 blocks)
    assert s.blocks.tables == {"a": [0, 1], "b": [2, 3]}
    out = run_step(s)  # a needs a third block: b (newest) is preempted
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and s.waiting[0] is b
    assert [c.request.request_id for c in out.chunks] == ["a"]
    s.blocks.check_integrity()
    s.finish(a)
    out = run_step(s)  # b recomputes its prompt and its sampled token
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("b", 0, 8)]
    s.blocks.check_integrity()


def test_a_request_preempts_itself_when_it_is_the_newest():
    s = make_scheduler(num_blocks=3, budget=64)
    a = make_request("a", 12)
    s.add(a)
    run_step(s)  # 3 blocks used, 13 tokens: needs a 4th
    out = run_step(s)
    assert out.preempted == [a] and not out.chunks
    s.blocks.check_integrity()


def test_finish_and_abort_free_everything():
    s = make_scheduler()
    a, b = make_request("a", 5), make_request("b", 5)
    s.add(a)
    s.add(b)
    run_step(s)
    s.finish(a)
    s.finish(b)
    assert not s.has_unfinished() and s.blocks.usage() == 0.0
    s.blocks.check_integrity()


def test_priority_policy_admits_and_preempts_by_priority():
    from engine.sampling_params import SamplingParams

    s = Scheduler(BlockManager(4, 4, enable_prefix_caching=False), 8, 64, True, "priority")
    low = make_request("low", 7, SamplingParams(priority=5))
    high = make_request("high", 7, SamplingParams(priority=-1))
    mid = make_request("mid", 3, SamplingParams(priority=0))
    for request in (low, high, mid):
        s.add(request)
    assert [r.request_id for r in s.waiting] == ["high", "mid", "low"]
    out = run_step(s)  # high: 2 blocks, mid: 1, low: 2 does not fit after them
    assert [c.request.request_id for c in out.chunks] == ["high", "mid"]
    for _ in range(4):
        out = run_step(s)  # high grows into a third block: mid (lowest running) goes
        if out.preempted:
            break
    assert [r.request_id for r in out.preempted] == ["mid"]
    assert [r.request_id for r in s.waiting] == ["mid", "low"]  # rank order, not arrival
    s.blocks.check_integrity()
