"""AsyncEngine: deltas on the event loop, abort on early exit, queue bound, health, death."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine import (
    LLM,
    EngineConfig,
    EngineDeadError,
    LLMEngine,
    QueueFullError,
    SamplingParams,
    load_tokenizer,
)
from engine.async_engine import AsyncEngine
from tests.helpers import make_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def make_engine(max_queue: int = 4) -> AsyncEngine:
    model = make_model(seed=5)
    config = EngineConfig(num_kv_blocks=64, block_size=4)
    return AsyncEngine(LLMEngine(model, load_tokenizer(None, model.config), config),
                       max_queue=max_queue)


async def collect(engine: AsyncEngine, prompt, params=GREEDY):
    deltas = [d async for d in engine.generate(engine.prepare(prompt, params))]
    return deltas


def test_concurrent_streams_match_offline_generation():
    engine = make_engine().start()
    prompts = ["abc", "hello there", [5, 6, 7, 8], "x"]

    async def main():
        return await asyncio.gather(*(collect(engine, p) for p in prompts))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    offline = LLM(make_model(seed=5), num_kv_blocks=64, block_size=4).generate(prompts, GREEDY)
    for deltas, expected in zip(results, offline, strict=True):
        assert deltas[-1].finished and deltas[-1].compute is not None
        assert [t for d in deltas for t in d.token_ids] == expected.token_ids
        assert "".join(d.text for d in deltas) == expected.text
    engine.engine.block_manager.check_integrity()


def test_leaving_a_stream_early_aborts_and_frees_blocks():
    engine = make_engine().start()

    async def main():
        params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        async for _ in engine.generate(engine.prepare("a long one", params)):
            break  # the client went away
        for _ in range(100):
            if not engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.02)

    try:
        asyncio.run(main())
        assert not engine.engine.has_unfinished()
        engine.engine.block_manager.check_integrity()
        assert engine.engine.block_manager.usage() == 0.0
    finally:
        engine.shutdown()


def test_queue_full_is_rejected_and_accepted_ones_complete():
    engine = make_engine(max_queue=4)
    gate = threading.Event()
    real_step = engine.engine.step

    def held_step():
        gate.wait(10)
        return real_step()

    engine.engine.step = held_step
    engine.start()

    async def main():
        tasks = [asyncio.ensure_future(collect(engine, f"hi {i}")) for i in range(4)]
        await asyncio.sleep(0.1)
        assert engine.num_waiting == 4
        with pytest.raises(QueueFullError):
            await collect(engine, "one too many")
        gate.set()
        results = await asyncio.gather(*tasks)
        assert all(r[-1].finish_reason == "length" for r in results)

    try:
        asyncio.run(main())
        engine.engine.block_manager.check_integrity()
    finally:
        gate.set()
        engine.shutdown()


def test_engine_death_is_reported():
    engine = make_engine()

    def broken_step():
        raise RuntimeError("device fell off")

    engine.engine.step = broken_step
    engine.start()

    async def main():
        with pytest.raises(EngineDeadError):
            await collect(engine, "hi")

    asyncio.run(main())
    engine._thread.join(2)
    health = engine.health()
    assert not health.ok and "device fell off" in health.reason
    with pytest.raises(EngineDeadError):
        asyncio.run(collect(engine, "again"))


def test_drain_refuses_new_requests_and_finishes_in_flight():
    engine = make_engine().start()

    async def main():
        task = asyncio.ensure_future(collect(engine, "in flight"))
        await asyncio.sleep(0.01)
        aborted = await engine.drain(timeout=10)
        assert aborted == 0
        deltas = await task
        assert deltas[-1].finish_reason == "length"
        with pytest.raises(EngineDeadError, match="draining"):
            await collect(engine, "late")

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_a_request_that_fails_to_add_or_a_failing_stats_callback_keeps_the_loop_alive():
    engine = make_engine()
    real_add = engine.engine.add_request

    def picky_add(request):
        if request.params.max_tokens == 3:
            raise ValueError("unexpected trouble")
        return real_add(request)

    def broken_callback(stats):
        raise RuntimeError("metrics exploded")

    engine.engine.add_request = picky_add
    engine.engine.stats_callback = broken_callback
    engine.start()

    async def main():
        with pytest.raises(ValueError, match="unexpected trouble"):
            await collect(engine, "bad", SamplingParams(max_tokens=3))
        deltas = await collect(engine, "good")
        assert deltas[-1].finished

    try:
        asyncio.run(main())
        assert engine.health().ok
    finally:
        engine.shutdown()
