"""AsyncEngine: the engine loop on its own thread, and an asyncio API for the server.

The HTTP side never runs a forward pass: `prepare` validates a request once (on the
caller's thread, with the engine's immutable `InputProcessor`), `generate` hands the
prepared request to the engine thread as a typed command and awaits the deltas that thread
posts back onto the caller's event loop. A consumer that stops iterating (a client
disconnect) aborts its request, which frees its KV blocks. `health()` is a typed state for
/health: the loop is alive and, while it has requests, computes tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from engine.core_messages import AbortRequest, AddRequest
from engine.engine_config import EngineConfig
from engine.errors import (
    EngineDeadError,
    EngineDrainingError,
    InvalidRequestError,
    QueueFullError,
)
from engine.input_processor import InputProcessor, PreparedRequest
from engine.llm_engine import LLMEngine, StepStats
from engine.request import RequestOutput
from engine.request_streams import RequestStreams
from engine.sampling_params import SamplingParams

logger = logging.getLogger("loopserve.engine")


class HealthState(enum.Enum):
    OK = "ok"
    DRAINING = "draining"  # accepts no new requests; those in flight finish
    STALLED = "stalled"  # requests wait or run, and no token was computed for stall_timeout
    DEAD = "dead"  # the loop raised
    STOPPED = "stopped"  # the loop is not running (not started or shut down)


@dataclasses.dataclass(frozen=True)
class Health:
    state: HealthState
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.state is HealthState.OK

    @property
    def reason(self) -> str:
        return f"{self.state.value}: {self.detail}" if self.detail else self.state.value


Command = AddRequest | AbortRequest  # the engine-core process's messages, here on a queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int = 256, stall_timeout: float = 60.0
                 ) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.stall_timeout = stall_timeout
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams = RequestStreams()
        self._pending_adds = 0
        self._lock = threading.Lock()
        self._stop = False
        self._accepting = True
        self._error: BaseException | None = None
        self._busy_since: float | None = None  # when the loop last went from idle to busy
        self._thread = threading.Thread(target=self._run, name="loopserve-engine", daemon=True)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None,
                        config: EngineConfig | None = None, max_queue: int = 256,
                        stats_callback: Callable[[StepStats], None] | None = None,
                        stall_timeout: float = 60.0) -> AsyncEngine:
        engine = LLMEngine.from_pretrained(model_dir, config, stats_callback=stats_callback)
        return cls(engine, max_queue=max_queue, stall_timeout=stall_timeout)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> AsyncEngine:
        if not self._thread.is_alive() and not self._stop:
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still in flight end with EngineDeadError."""
        self._accepting = False
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    async def drain(self, timeout: float) -> int:
        """Stop accepting requests, let those in flight finish for up to `timeout` seconds,
        then abort the rest. Returns how many had to be aborted."""
        self._accepting = False
        return await self._streams.wait_or_abort(timeout, self.abort)

    @property
    def processor(self) -> InputProcessor:
        return self.engine.processor

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def set_stats_callback(self, callback: Callable[[StepStats], None] | None) -> None:
        """Called on the engine thread after every step that computed tokens."""
        self.engine.stats_callback = callback

    def kv_cache_usage(self) -> float:
        return self.engine.block_manager.usage()

    def health(self) -> Health:
        if self._error is not None:
            return Health(HealthState.DEAD, f"engine loop died: {self._error!r}")
        if not self._thread.is_alive():
            return Health(HealthState.STOPPED, "engine loop is not running")
        busy_since = self._busy_since
        if busy_since is not None:
            stalled = time.monotonic() - max(busy_since, self.engine.last_progress)
            if stalled > self.stall_timeout:
                return Health(HealthState.STALLED, f"no token computed for {stalled:.1f}s "
                                                   f"with requests waiting or running")
        if not self._accepting:
            return Health(HealthState.DRAINING, "accepting no new requests")
        return Health(HealthState.OK)

    @property
    def num_waiting(self) -> int:
        return self._pending_adds + self.engine.num_waiting

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ requests
    def prepare(self, prompt: str | list[int], params: SamplingParams,
                request_id: str | None = None) -> PreparedRequest:
        """Tokenize and validate (InvalidRequestError names the field); thread-safe."""
        return self.engine.processor.prepare(request_id or f"cmpl-{uuid.uuid4().hex}", prompt,
                                             params)

    async def generate(self, request: PreparedRequest) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; the last has `finished=True`. Leaving early aborts it."""
        self._admit(request)
        request_id = request.request_id

        def on_close(finished: bool) -> None:
            self._streams.close(request_id)
            if not finished:
                self.abort(request_id)

        async with contextlib.aclosing(self._streams.deltas(request_id, on_close)) as deltas:
            async for delta in deltas:
                yield delta

    def _admit(self, request: PreparedRequest) -> None:
        """Errors surface here, before any streaming starts."""
        if not self._accepting:
            raise EngineDrainingError("the server is draining and accepts no new requests")
        health = self.health()
        if not health.ok:
            raise EngineDeadError(health.reason)
        with self._lock:
            if self.num_waiting >= self.max_queue:
                raise QueueFullError(f"the waiting queue is full ({self.max_queue} requests)")
            self._streams.open(request.request_id)
            self._pending_adds += 1
        self._commands.put(AddRequest(request))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Thread-safe; the request's blocks are freed on the engine thread."""
        self._commands.put(AbortRequest(request_id))
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while not self._stop:
                self._apply_commands()
                if self.engine.has_unfinished():
                    if self._busy_since is None:
                        self._busy_since = time.monotonic()
                    self._deliver_all(self.engine.step())
                else:
                    self._busy_since = None
                    self._wake.wait(0.1)
                    self._wake.clear()
        except BaseException as exc:  # noqa: BLE001 - the loop must report any death
            logger.exception("engine loop died")
            self._error = exc
        finally:
            self._fail_all()

    def _apply_commands(self) -> None:
        while True:
            try:
                command: Command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, AddRequest):
                self._add(command.request)
            else:
                final = self.engine.abort_request(command.request_id)
                if final is not None:
                    self._deliver(command.request_id, final)

    def _add(self, request: PreparedRequest) -> None:
        try:
            if request.request_id in self._streams:
                self.engine.add_request(request)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the loop
            if not isinstance(exc, InvalidRequestError):
                logger.exception("request %s could not be added", request.request_id)
            self._deliver(request.request_id, exc)
        finally:
            with self._lock:
                self._pending_adds -= 1

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._streams.deliver(request_id, item)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        self._streams.deliver_all(outputs)

    def _fail_all(self) -> None:
        reason = f"engine loop died: {self._error!r}" if self._error else "engine shut down"
        self._streams.fail_all(EngineDeadError(reason))
