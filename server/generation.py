"""`Generation`: the engine requests behind one HTTP request (one per prompt).

It owns their lifetime: admission (errors surface before any response is sent), the stream
of deltas under the request's deadline, and the abort of whatever is unfinished when the
client goes away or anything fails, so that no KV block outlives its request. Each prompt's
`PromptTally` keeps what the engine reported for it (tokens, cached tokens, compute, prompt
logprobs): the response's usage is counted from these.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import anyio
from starlette.requests import Request

from engine.compute_stats import ComputeSummary
from engine.engine_client import EngineClient
from engine.errors import LoopServeError
from engine.input_processor import PreparedRequest
from engine.request import RequestOutput
from server.errors import APIError, ClientDisconnected, from_engine_error
from server.metrics import RequestObserver, ServerMetrics

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class RequestContext:
    """What the middleware knows about an HTTP request: its id, arrival and deadline."""

    http_id: str  # X-Request-Id: in logs and as the metrics' exemplar
    arrival: float  # time.monotonic()
    timeout: float  # seconds; 0: no deadline

    @classmethod
    def of(cls, request: Request, timeout: float) -> RequestContext:
        state = request.scope.get("state", {})
        return cls(state.get("request_id", ""), state.get("arrival", time.monotonic()), timeout)

    def loop_deadline(self) -> float | None:
        """The deadline on the event loop's clock (asyncio.timeout_at wants that clock)."""
        if not self.timeout:
            return None
        loop = asyncio.get_running_loop()
        return loop.time() + self.timeout - (time.monotonic() - self.arrival)


@dataclasses.dataclass
class PromptTally:
    """What the engine reported for one prompt of the request, kept from its deltas."""

    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    choice_tokens: dict[int, int] = dataclasses.field(default_factory=dict)  # index -> count
    compute: ComputeSummary | None = None  # the engine's summary, when the prompt finished
    prompt_logprobs: list | None = None  # list[TokenLogprob | None], entry 0 None

    def add(self, delta: RequestOutput) -> None:
        self.cached_tokens = delta.num_cached_tokens
        for piece in delta.outputs:
            self.choice_tokens[piece.index] = piece.num_tokens
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finished:
            self.compute = delta.compute

    @property
    def completion_tokens(self) -> int:
        return sum(self.choice_tokens.values())



def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, APIError):
        return {400: "invalid_request", 404: "invalid_request", 429: "queue_full",
                504: "timeout"}.get(exc.status, "aborted" if exc.code == "aborted"
                                    else "engine_unavailable")
    if isinstance(exc, (asyncio.CancelledError, ClientDisconnected)):
        return "client_disconnect"
    return "internal_error"


class Generation:
    """One prepared engine request per prompt of the HTTP request."""

    def __init__(self, engine: EngineClient, metrics: ServerMetrics, ctx: RequestContext,
                 requests: list[PreparedRequest]) -> None:
        self.engine = engine
        self.ctx = ctx
        self.request_ids = [r.request_id for r in requests]
        self.prompts = [list(r.prompt_token_ids) for r in requests]
        self.params = [r.params for r in requests]
        self.tallies = [PromptTally(len(r.prompt_token_ids)) for r in requests]
        self.observers: list[RequestObserver] = [
            metrics.observer(ctx.http_id, ctx.arrival) for _ in requests]
        self._iterators = [engine.generate(r) for r in requests]
        self.finished = [False] * len(requests)
        self._firsts: list[RequestOutput] = []
        self._deadline = ctx.loop_deadline()
        self._failure: str | None = None
        self._pumps: list[asyncio.Task] = []
        self._closed = False

    # ------------------------------------------------------------------ deltas
    async def _next(self, i: int) -> RequestOutput:
        """The next delta of prompt i; every failure becomes an APIError."""
        try:
            if self._deadline is None:
                delta = await anext(self._iterators[i])
            else:
                async with asyncio.timeout_at(self._deadline):
                    delta = await anext(self._iterators[i])
        except TimeoutError:
            self._failure = "timeout"
            raise APIError(504, f"the request did not finish within its deadline of "
                                f"{self.ctx.timeout:g} s and was aborted",
                           code="request_timeout") from None
        except LoopServeError as exc:
            error = from_engine_error(exc)
            self._failure = failure_reason(error)
            raise error from None
        self.observers[i].on_delta(delta)
        self.tallies[i].add(delta)
        if delta.finished:
            self._check_not_aborted(delta)
            self.finished[i] = True
        return delta

    def _check_not_aborted(self, delta: RequestOutput) -> None:
        """An engine-side abort (the drain ran out of time) fails the request."""
        if any(o.finish_reason == "abort" for o in delta.outputs):
            self._failure = "aborted"
            raise APIError(503, "the server shut down before the request finished",
                           code="aborted")

    async def start(self) -> None:
        """Submit every prompt and wait for its first delta (admission errors raise here)."""
        try:
            if len(self._iterators) == 1:
                self._firsts = [await self._next(0)]
                return
            self._firsts = await self._first_of_each()
        except BaseException:
            await self.close()
            raise

    async def _first_of_each(self) -> list[RequestOutput]:
        """Concurrently (the prompts are batched together); the first failure wins."""
        tasks = [asyncio.ensure_future(self._next(i)) for i in range(len(self.prompts))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        return [task.result() for task in tasks]

    async def deltas(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, delta) until every prompt finished; call `start` first."""
        for i, first in enumerate(self._firsts):
            yield i, first
        if len(self._iterators) == 1:
            while not self.finished[0]:
                yield 0, await self._next(0)
            return
        async for item in self._merged():
            yield item

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                while not self.finished[i]:
                    queue.put_nowait((i, await self._next(i)))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((i, exc))

        # a pump may queue several deltas before the consumer wakes: stop on the last final
        # delta taken from the queue, not on the finished flags the pumps set
        running = {i for i in range(len(self.prompts)) if not self.finished[i]}
        self._pumps = [asyncio.ensure_future(pump(i)) for i in running]
        while running:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                running.discard(i)
            yield i, item

    # ------------------------------------------------------------------ cleanup
    async def close(self) -> None:
        """Abort what is unfinished and release the engine streams (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        reason = self._failure or "client_disconnect"
        with anyio.CancelScope(shield=True):
            for task in self._pumps:
                task.cancel()
            if self._pumps:
                await asyncio.gather(*self._pumps, return_exceptions=True)
            for i, iterator in enumerate(self._iterators):
                if not self.finished[i]:
                    self.engine.abort(self.request_ids[i])
                    self.observers[i].fail(reason)
                await iterator.aclose()


async def run_until_disconnect(work: Awaitable[T], request: Request) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task in done:
        return task.result()
    raise ClientDisconnected


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
