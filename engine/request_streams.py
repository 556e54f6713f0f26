"""`RequestStreams`: the asyncio side of the requests in flight, shared by both engines.

Each request's deltas are produced on an engine thread (the thread engine's loop) or on the
event loop itself (the socket of an engine-core process), and consumed on the event loop
that asked for them. `RequestStreams` keeps one asyncio queue per request, hands a step's
outputs over in one `call_soon_threadsafe` per other event loop (straight into the queues
on the producer's own), and yields a request's deltas until its final one;
an item that is an exception is raised in the consumer instead (after the deltas queued
before it). Deltas that queued up while the consumer was busy are yielded as one
(`engine/output_merge.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterable

from engine.errors import InvalidRequestError
from engine.output_merge import merge_outputs
from engine.request import RequestOutput

Item = RequestOutput | BaseException


@dataclasses.dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class RequestStreams:
    """Not locked itself (each dict operation is atomic under the GIL): an owner that must
    check and open under one lock, with its own counts, holds its lock around `open`."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._streams

    def ids(self) -> list[str]:
        return list(self._streams)

    def open(self, request_id: str) -> None:
        """A queue for the request on the running event loop."""
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight")
        self._streams[request_id] = _Stream(asyncio.get_running_loop(), asyncio.Queue())

    def close(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def deltas(self, request_id: str, on_close: Callable[[bool], None]
                     ) -> AsyncIterator[RequestOutput]:
        """The request's deltas up to the final one. `on_close(finished)` runs however the
        consumer leaves (after the final delta, on an error, or early)."""
        queue = self._streams[request_id].queue
        finished = False
        try:
            while not finished:
                ready, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                item, error = _take_queued(queue, item, ready)
                finished = item.finished
                yield item
                if error is not None:
                    raise error
        finally:
            on_close(finished)

    # ------------------------------------------------------------ from the engine's thread
    def deliver(self, request_id: str, item: Item) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if stream.loop is _running_loop():
            _put_all([(stream.queue, item)])
            return
        with contextlib.suppress(RuntimeError):  # the consumer's event loop may be closed
            stream.loop.call_soon_threadsafe(_put_all, [(stream.queue, item)])

    def deliver_all(self, outputs: Iterable[RequestOutput]) -> None:
        """One hand-off per event loop, not one wake-up per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Item]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, output))
        here = _running_loop()
        for loop, items in by_loop.items():
            if loop is here:  # the producer runs on the consumers' loop: no hand-off
                _put_all(items)
                continue
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, items)

    async def wait_or_abort(self, timeout: float, abort: Callable[[str], None]) -> int:
        """Let the requests in flight finish for up to `timeout` seconds, then `abort` the
        rest (a drain). Returns how many had to be aborted."""
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.ids()
        for request_id in left:
            abort(request_id)
        return len(left)

    def fail_all(self, error: BaseException) -> None:
        for request_id in self.ids():
            self.deliver(request_id, error)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _put_all(items: list[tuple[asyncio.Queue, Item]]) -> None:
    """Into the queues, with the time they were ready (on the consumers' loop)."""
    now = time.monotonic()
    for target, item in items:
        target.put_nowait((now, item))


def _take_queued(queue: asyncio.Queue, first: RequestOutput, ready: float
                 ) -> tuple[RequestOutput, BaseException | None]:
    """`first` (ready at `ready`) merged with the deltas queued behind it, up to the final
    one or an error (returned, to be raised once the merged delta is out)."""
    merged = first
    while not merged.finished and not queue.empty():
        next_ready, item = queue.get_nowait()
        if isinstance(item, BaseException):
            return merged, item
        merged, ready = merge_outputs(merged, item, ready), next_ready
    return merged, None
