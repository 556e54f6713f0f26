"""Offering load and timing each request.

Two ways to offer load:
- open loop (`request_rate`): requests start at the times of a Poisson or gamma process,
  whatever is still in flight, optionally capped by `max_concurrency` (vLLM's modes);
- closed loop (`concurrency`): that many workers, each sending its next request as soon as
  its previous one finished.
A run ends after `num_prompts` requests or, for new requests, after `duration` seconds,
whichever comes first; requests in flight then finish. Every request streams, with
`stream_options.include_usage`, so TTFT and ITL are measured and the usage (with
loopserve's compute) arrives in the final chunk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import time
from collections.abc import Iterator
from typing import Any

from clients.async_client import AsyncClient, AsyncStream
from clients.bench.arrivals import start_times
from clients.bench.datasets import BenchRequest
from clients.bench.metrics import RequestResult
from clients.bench.progress import Progress
from clients.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    LoopserveError,
    StreamError,
)


@dataclasses.dataclass(frozen=True)
class Target:
    """What to send: the endpoint and the request fields shared by every request."""

    endpoint: str = "completions"  # or "chat"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    chars_per_token: float = 1.0  # to estimate prompt tokens when a server sends no usage

    def __post_init__(self) -> None:
        if self.endpoint not in ("completions", "chat"):
            raise ValueError(f"endpoint must be 'completions' or 'chat', got {self.endpoint!r}")


@dataclasses.dataclass(frozen=True)
class Load:
    """How requests are offered, and when the run stops."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None  # cap on requests in flight, open loop
    concurrency: int | None = None  # closed loop with this many workers (ignores the rate)
    num_prompts: int | None = 100
    duration: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts is None and self.duration is None:
            raise ValueError("give a request count (--num-prompts), a duration, or both")
        for name in ("max_concurrency", "concurrency", "num_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.duration is not None and self.duration <= 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration}")
        if (self.num_prompts is None and math.isinf(self.request_rate)
                and not (self.concurrency or self.max_concurrency)):
            raise ValueError("an infinite request rate for a duration would start requests "
                             "without end: give a rate, --max-concurrency or --num-prompts")

    @property
    def label(self) -> str:
        if self.concurrency:
            return f"concurrency {self.concurrency}"
        return f"rate {self.request_rate:g}/s"


def error_type(error: LoopserveError) -> str:
    """A short, countable name of an error: '429 rate_limit_error', 'timeout', ..."""
    if isinstance(error, APIStatusError):
        return f"{error.status_code} {error.type}" if error.type else str(error.status_code)
    if isinstance(error, StreamError):
        return f"stream {error.code or error.type or 'error'}"
    if isinstance(error, APITimeoutError):
        return "timeout"
    if isinstance(error, APIConnectionError):
        return "connection"
    return type(error).__name__


async def open_stream(client: AsyncClient, target: Target, request: BenchRequest
                      ) -> AsyncStream:
    params = dict(target.params)
    if request.max_tokens is not None:
        params["max_tokens"] = request.max_tokens
    if target.endpoint == "chat":
        return await client.stream_chat(request.chat_messages(), **params)
    return await client.stream_complete(request.completion_prompt(), **params)


def on_chunk(result: RequestResult, text: str, at: float) -> None:
    """Record a chunk that carries text, `at` seconds after the run's start."""
    if not text:
        return
    if result.ttft is None:
        result.ttft = at - result.start
    else:
        result.itl.append(at - result.chunk_times[-1])
    result.chunk_times.append(at)
    result.text += text


def on_finish(result: RequestResult, stream: AsyncStream, request: BenchRequest,
              target: Target) -> None:
    result.success = True
    usage = stream.usage
    if usage is not None:
        result.prompt_tokens, result.output_tokens = usage.prompt_tokens, usage.completion_tokens
        result.compute, result.cached_tokens = usage.compute, usage.cached_tokens
    else:  # a server without include_usage: estimate
        result.prompt_tokens = round(request.prompt_chars() / target.chars_per_token)
        result.output_tokens = len(result.chunk_times)
    if request.answer is not None:
        result.correct = result.text.strip() == request.answer.strip()


async def send_one(client: AsyncClient, target: Target, request: BenchRequest, t0: float
                   ) -> RequestResult:
    """Send one streamed request and time it; errors are recorded, never raised."""
    result = RequestResult(start=time.perf_counter() - t0)
    try:
        stream = await open_stream(client, target, request)
        async with stream:
            async for chunk in stream:
                on_chunk(result, chunk.text, time.perf_counter() - t0)
        on_finish(result, stream, request, target)
    except LoopserveError as error:
        result.error, result.message = error_type(error), str(error)
    except (ValueError, TypeError) as error:  # a chunk or usage of the wrong shape
        result.success = False
        result.error, result.message = "invalid_response", f"{type(error).__name__}: {error}"
    result.e2el = time.perf_counter() - t0 - result.start
    return result


class Run:
    """One measured run: offers `requests` as `load` says and collects their results."""

    def __init__(self, client: AsyncClient, target: Target, load: Load,
                 progress: Progress | None = None) -> None:
        self.client, self.target, self.load = client, target, load
        self.progress = progress
        self.results: list[RequestResult] = []
        self.t0 = 0.0

    async def send(self, request: BenchRequest) -> RequestResult:
        if self.progress:
            self.progress.on_send()
        result = await send_one(self.client, self.target, request, self.t0)
        self.results.append(result)
        if self.progress:
            self.progress.on_done(result)
        return result

    def expired(self, offset: float) -> bool:
        return self.load.duration is not None and offset >= self.load.duration

    async def open_loop(self, requests: Iterator[BenchRequest]) -> None:
        load = self.load
        semaphore = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
        tasks = []
        for request, offset in zip(requests, start_times(load.request_rate, load.burstiness,
                                                         load.seed), strict=False):
            await asyncio.sleep(max(0.0, self.t0 + offset - time.perf_counter()))
            if semaphore is not None:
                await semaphore.acquire()  # a late start, when the cap is reached
            if self.expired(time.perf_counter() - self.t0):
                break
            tasks.append(asyncio.create_task(self.send_released(request, semaphore)))
        await asyncio.gather(*tasks)

    async def send_released(self, request: BenchRequest,
                            semaphore: asyncio.Semaphore | None) -> None:
        try:
            await self.send(request)
        finally:
            if semaphore is not None:
                semaphore.release()

    async def closed_loop(self, requests: Iterator[BenchRequest]) -> None:
        async def worker() -> None:
            while not self.expired(time.perf_counter() - self.t0):
                request = next(requests, None)
                if request is None:
                    return
                await self.send(request)

        await asyncio.gather(*(worker() for _ in range(self.load.concurrency or 1)))

    async def run(self, pool: list[BenchRequest]) -> tuple[list[RequestResult], float]:
        """Results in completion order, and the run's duration (first send to last answer)."""
        requests = itertools.islice(itertools.cycle(pool), self.load.num_prompts)
        self.t0 = time.perf_counter()
        if self.load.concurrency:
            await self.closed_loop(requests)
        else:
            await self.open_loop(requests)
        return self.results, time.perf_counter() - self.t0


async def warm_up(client: AsyncClient, target: Target, requests: list[BenchRequest],
                  concurrency: int) -> list[RequestResult]:
    """Send `requests` (up to `concurrency` at a time) and keep none of their figures."""
    load = Load(concurrency=max(1, min(concurrency, len(requests))), num_prompts=len(requests))
    results, _ = await Run(client, target, load).run(requests)
    return results
