"""Test hooks that run inside the engine-core process (`EngineCoreClient.call_in_core`):
each takes the core's `LLMEngine` first. They slow, hold or break its steps, block its loop,
and read its KV pool, as the thread-engine tests do by patching the engine directly."""

from __future__ import annotations

import os
import time

from engine.llm_engine import LLMEngine
from engine.scheduler import SchedulerOutput


def slow_steps(llm: LLMEngine, seconds: float) -> None:
    """Every step takes at least `seconds` (generation outlasts the client)."""
    real_step = llm.step

    def step():
        time.sleep(seconds)
        return real_step()

    llm.step = step


def hold_steps(llm: LLMEngine, path: str) -> None:
    """Every step waits (up to 20 s) until the file `path` exists: the test's gate."""
    real_step = llm.step

    def step():
        deadline = time.monotonic() + 20
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.005)
        return real_step()

    llm.step = step


def break_steps(llm: LLMEngine, message: str) -> None:
    def step():
        raise RuntimeError(message)

    llm.step = step


def schedule_nothing_until(llm: LLMEngine, path: str) -> None:
    """The livelock shape: steps run and schedule nothing until the file `path` exists."""
    scheduler = llm.scheduler
    real_schedule = scheduler.schedule
    scheduler.schedule = lambda: (real_schedule() if os.path.exists(path)
                                  else SchedulerOutput([], [], []))


def block_loop(llm: LLMEngine, seconds: float) -> None:
    """The core stops answering: its loop sleeps inside this hook."""
    time.sleep(seconds)


def frozen_objects(llm: LLMEngine) -> int:
    """How many objects the core froze out of the garbage collector's scans."""
    import gc

    return gc.get_freeze_count()


def num_steps(llm: LLMEngine) -> int:
    return llm.num_steps


def is_idle(llm: LLMEngine) -> bool:
    return not llm.has_unfinished()


def block_pool(llm: LLMEngine) -> tuple[float, int]:
    """KV pool usage and how many block tables it holds, after its integrity check."""
    blocks = llm.block_manager
    blocks.check_integrity()
    return blocks.usage(), len(blocks.tables)
