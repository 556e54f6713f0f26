"""EngineCoreClient: the API process's side of the engine-core process, with the interface
of `AsyncEngine` (prepare, generate, abort, drain, health, counts, start, shutdown).

The model, KV cache, scheduler and step loop live in a spawned process (`core_process`);
this side holds only the immutable `InputProcessor` (validation and tokenization happen
here, once), the streams of the requests in flight, and their detokenizers (the core sends
token ids; text and stop strings are made here, see `engine.detokenizer`). The socket to
the core lives on the event loop (`core_wire.LoopWire`), as vLLM's AsyncLLM keeps its
sockets: the commands of one loop iteration go out as one `CommandBatch`, each
`OutputBatch`'s deltas go straight into the streams' queues, its step statistics to the
stats callback (metrics), its status to `health` and the gauges. No thread stands between
the socket and the requests (two hand-offs per token, measured as the API process's largest
cost at concurrency 1), and a write never blocks: a frozen core cannot stall the loop.

Failure semantics: the core is dead when the process is gone (EOF on the socket, or no
process), when it is silent for more than `core_timeout` seconds (its heartbeat thread
sends at least every 0.1 s, even in the middle of a long step: silence means the process
is frozen), or when its step loop reports one iteration running for more than
`step_timeout` seconds (a stuck step; a long one below the limit is fine). A timer on the
loop looks every `POLL_SECONDS`; silence is counted only while the loop itself ran (a loop
that was blocked cannot tell). Then the cause is logged, a live core is killed, every
request in flight ends with `EngineDeadError` (HTTP 503), and `health()` reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from engine.async_engine import Health, HealthState
from engine.core_messages import (
    AbortRequest,
    AddRequest,
    CallHook,
    CommandBatch,
    CoreAlive,
    CoreDied,
    CoreFailed,
    CoreReady,
    CoreStatus,
    FromCore,
    HookResult,
    OutputBatch,
    RequestFailed,
    Shutdown,
    ToCore,
    decode,
    encode,
)
from engine.core_process import run_core
from engine.core_wire import BlockingWire, LoopWire, socket_of
from engine.detokenizer import RequestDetokenizer
from engine.engine_config import EngineConfig
from engine.errors import (
    EngineDeadError,
    EngineDrainingError,
    QueueFullError,
)
from engine.input_processor import InputProcessor, PreparedRequest
from engine.llm_engine import StepStats
from engine.request import RequestOutput
from engine.request_streams import RequestStreams
from engine.sampling_params import OutputKind, SamplingParams

logger = logging.getLogger("loopserve.engine")

POLL_SECONDS = 0.05  # how often the loop's timer looks at the core's liveness


def watchable(request: PreparedRequest) -> PreparedRequest:
    """Stop strings are matched here, on the text of every delta: a request with some gets
    its deltas as they come, whatever output kind it asked for (so that it stops as soon as
    one appears instead of running to max_tokens)."""
    if request.params.output_kind is OutputKind.FINAL and request.params.stop:
        params = dataclasses.replace(request.params, output_kind=OutputKind.DELTA)
        return dataclasses.replace(request, params=params)
    return request


class EngineCoreClient:
    def __init__(self, model_dir: str | Path | None, config: EngineConfig | None = None,
                 max_queue: int = 256, stall_timeout: float = 60.0, core_timeout: float = 2.0,
                 step_timeout: float = 60.0, startup_timeout: float = 600.0) -> None:
        self.max_queue = max_queue
        self.stall_timeout = stall_timeout
        self.core_timeout = core_timeout
        self.step_timeout = step_timeout
        self.stats_callback: Callable[[StepStats], None] | None = None
        self._streams = RequestStreams()
        self._texts: dict[str, RequestDetokenizer] = {}  # of the requests in flight
        self._lock = threading.Lock()
        self._accepting = True
        self._stopped = False
        self._dead: str | None = None  # why the core is dead, once it is
        self._died_reason: str | None = None  # the core's own last word (CoreDied)
        self._adds_sent = 0
        self._busy_since: float | None = None  # when the streams went from none to some
        self._last_progress = time.monotonic()  # when a step last computed a token
        self._last_heard = time.monotonic()
        self._hooks: dict[int, Future] = {}
        self._hook_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start()
        self._loop_thread: int | None = None
        self._wire: LoopWire | None = None
        self._unsent: list[ToCore] = []  # this loop iteration's commands, sent as one batch
        self._last_tick = self._resumed_at = time.monotonic()
        self.messages_received = 0
        self.bytes_received = 0
        self._spawn(model_dir, config or EngineConfig(), startup_timeout)

    # ------------------------------------------------------------------ start-up
    def _spawn(self, model_dir: str | Path | None, config: EngineConfig, timeout: float
               ) -> None:
        """Start the core and wait until it has loaded the model; its load error is raised
        here (ConfigError, CheckpointError, ...)."""
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)  # a socket pair, handed to the child by spawn
        self.process = ctx.Process(target=run_core, name="loopserve-engine-core", daemon=True,
                                   args=(child, None if model_dir is None else str(model_dir),
                                         config, os.getpid()))
        self.process.start()
        child.close()
        self._blocking = BlockingWire(socket_of(parent))
        try:
            ready = self._await_ready(timeout)
        except BaseException:
            self._kill()
            self._blocking.close()
            raise
        self.processor: InputProcessor = ready.processor
        self.config: EngineConfig = ready.config
        self.max_model_len = ready.max_model_len
        self._status = CoreStatus(0, 0, 0.0, 0, 0)
        self._last_heard = time.monotonic()

    def _await_ready(self, timeout: float) -> CoreReady:
        deadline = time.monotonic() + timeout
        while not self._blocking.poll(0.1):
            if not self.process.is_alive():
                break
            if time.monotonic() > deadline:
                raise EngineDeadError(f"the engine core did not load the model within "
                                      f"{timeout:g} s")
        try:
            message = decode(self._blocking.recv()) if self._blocking.poll(0) else None
        except EOFError:
            message = None
        if message is None:
            self.process.join(5)
            raise EngineDeadError(f"the engine core exited with code "
                                  f"{self.process.exitcode} while loading the model")
        if isinstance(message, CoreFailed):
            raise message.error
        if not isinstance(message, CoreReady):
            raise EngineDeadError(f"the engine core answered {type(message).__name__} "
                                  f"instead of CoreReady")
        return message

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> EngineCoreClient:
        """Attach the core's socket to the running event loop (call it on that loop)."""
        if self._wire is None and not self._stopped:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            self._last_heard = self._last_tick = self._resumed_at = time.monotonic()
            self._wire = LoopWire(self._blocking, self._loop, self._on_frame, self._on_eof)
            self._loop.call_later(POLL_SECONDS, self._tick)
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the core (requests still in flight end with EngineDeadError) and reap it."""
        self._accepting = False
        self._stopped = True
        self._send_now_or_soon(Shutdown())
        self.process.join(timeout)
        self._kill()
        self._mark_dead("engine shut down", log=False)
        self._on_loop(self._close_wire)

    def _close_wire(self) -> None:
        if self._wire is not None:
            self._wire.close()
        else:
            self._blocking.close()

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)

    async def drain(self, timeout: float) -> int:
        """Stop accepting requests, let those in flight finish for up to `timeout` seconds,
        then abort the rest (through the core). Returns how many had to be aborted."""
        self._accepting = False
        return await self._streams.wait_or_abort(timeout, self.abort)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def core_pid(self) -> int | None:
        return self.process.pid

    def set_stats_callback(self, callback: Callable[[StepStats], None] | None) -> None:
        self.stats_callback = callback

    def kv_cache_usage(self) -> float:
        return self._status.kv_cache_usage

    def ipc_counts(self) -> tuple[int, int]:
        """Messages and bytes received from the core so far."""
        return self.messages_received, self.bytes_received

    # ------------------------------------------------------------------ health
    def health(self) -> Health:
        if self._dead is not None:
            state = HealthState.STOPPED if self._stopped else HealthState.DEAD
            return Health(state, self._dead)
        if self._wire is None:
            return Health(HealthState.STOPPED, "engine core is not connected")
        silent = self._silence()
        if silent > self.core_timeout:  # the timer kills it on its next look
            return Health(HealthState.DEAD, self._silent_reason(silent))
        busy_since = self._busy_since
        if busy_since is not None:
            stalled = time.monotonic() - max(busy_since, self._last_progress)
            if stalled > self.stall_timeout:
                return Health(HealthState.STALLED, f"no token computed for {stalled:.1f}s "
                                                   f"with requests waiting or running")
        if not self._accepting:
            return Health(HealthState.DRAINING, "accepting no new requests")
        return Health(HealthState.OK)

    @property
    def num_waiting(self) -> int:
        status = self._status
        return max(0, self._adds_sent - status.adds_seen) + status.num_waiting

    @property
    def num_running(self) -> int:
        return self._status.num_running

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # ------------------------------------------------------------------ requests
    def prepare(self, prompt: str | list[int], params: SamplingParams,
                request_id: str | None = None) -> PreparedRequest:
        """Tokenize and validate (InvalidRequestError names the field), in this process."""
        return self.processor.prepare(request_id or f"cmpl-{uuid.uuid4().hex}", prompt, params)

    async def generate(self, request: PreparedRequest) -> AsyncIterator[RequestOutput]:
        """Deltas of one request; the last has `finished=True`. Leaving early aborts it."""
        self._admit(request)
        request_id = request.request_id

        def on_close(finished: bool) -> None:
            with self._lock:
                self._streams.close(request_id)
                self._texts.pop(request_id, None)
                if not self._streams:
                    self._busy_since = None
            if not finished:
                self.abort(request_id)

        async with contextlib.aclosing(self._streams.deltas(request_id, on_close)) as deltas:
            async for delta in deltas:
                yield delta

    def _admit(self, request: PreparedRequest) -> None:
        """Errors surface here, before any streaming starts; a dead core wins over a drain."""
        request = watchable(request)
        health = self.health()
        if health.state is HealthState.DRAINING:
            raise EngineDrainingError("the server is draining and accepts no new requests")
        if not health.ok:
            raise EngineDeadError(health.reason)
        with self._lock:
            if self.num_waiting >= self.max_queue:
                raise QueueFullError(f"the waiting queue is full ({self.max_queue} requests)")
            if not self._streams:
                self._busy_since = time.monotonic()
            self._streams.open(request.request_id)
            self._texts[request.request_id] = RequestDetokenizer(
                self.processor.tokenizer, request.params, list(request.prompt_token_ids))
            self._adds_sent += 1
        self._send_soon(AddRequest(request))

    def abort(self, request_id: str) -> None:
        """Thread-safe; the core frees the request's blocks."""
        if self._dead is None:
            self._send_soon(AbortRequest(request_id))

    def call_in_core(self, target: str, *args: Any, timeout: float = 30.0) -> Any:
        """Run `module:function(llm_engine, *args)` on the core's loop and return its value
        (for tests: slow, hold or break steps; inspect the KV pool). Blocking."""
        return self.submit_to_core(target, *args).result(timeout)

    def submit_to_core(self, target: str, *args: Any) -> Future:
        """`call_in_core` without waiting: the future of the hook's value."""
        future: Future = Future()
        call_id = next(self._hook_ids)
        self._hooks[call_id] = future
        if self._dead is not None:
            future.set_exception(EngineDeadError(self._dead))
        else:
            self._send_soon(CallHook(call_id, target, args))
        return future

    # ------------------------------------------------------------------ sending
    def _on_loop(self, callback: Callable[[], None]) -> None:
        """Run `callback` on the event loop: now when called there (or when there is no
        running loop to ask), else soon."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread or loop.is_closed():
            callback()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(callback)

    def _send_soon(self, command: ToCore) -> None:
        """Queue a command for this loop iteration's batch (thread-safe)."""
        self._on_loop(lambda: self._queue(command))

    def _queue(self, command: ToCore) -> None:
        if not self._unsent and self._loop is not None:
            self._loop.call_soon(self._flush)
        self._unsent.append(command)

    def _flush(self) -> None:
        batch, self._unsent = self._unsent, []
        if not batch or self._dead is not None:
            return
        data = encode(CommandBatch(tuple(batch)))
        try:
            if self._wire is not None:
                self._wire.send(data)
            else:
                self._blocking.send(data)
        except OSError:
            pass  # the core is gone: its EOF reports it

    def _send_now_or_soon(self, command: ToCore) -> None:
        """Send at once on the loop's thread (whoever then blocks, the command is out)."""
        def send() -> None:
            self._unsent.append(command)
            self._flush()
        self._on_loop(send)

    # ------------------------------------------------------------------ receiving
    def _on_frame(self, data: bytes) -> None:
        if self._dead is not None:
            return
        self.messages_received += 1
        self.bytes_received += len(data)
        self._last_heard = time.monotonic()
        try:
            self._dispatch(decode(data))
        except Exception as exc:  # noqa: BLE001 - the loop would log it and read on
            logger.exception("message from the engine core could not be handled")
            self._mark_dead(f"engine core sent a message this process cannot handle "
                            f"({type(exc).__name__}: {exc}); it was killed")
            self._kill()

    def _silence(self) -> float:
        """Seconds without a word from the core, counted only while the loop ran: after the
        loop itself was blocked, the core's messages may wait unread, so the count starts
        again when the loop resumes (and is 0 until its timer has run since)."""
        now = time.monotonic()
        if self._loop_stalled(now):
            return 0.0
        return now - max(self._last_heard, self._resumed_at)

    def _loop_stalled(self, now: float) -> bool:
        return now - self._last_tick > POLL_SECONDS + self.core_timeout / 2

    def _tick(self) -> None:
        """Timer: is the core still there? Reschedules itself until the core is dead."""
        now = time.monotonic()
        if self._loop_stalled(now):
            self._resumed_at = now
        self._last_tick = now
        if self._dead is None:
            self._check_alive()
        if self._dead is None and self._loop is not None:
            self._loop.call_later(POLL_SECONDS, self._tick)

    def _check_alive(self) -> None:
        silent = self._silence()
        if not self.process.is_alive():
            self._on_eof()
        elif silent > self.core_timeout:
            self._mark_dead(f"{self._silent_reason(silent)}; it was killed")
            self._kill()

    def _silent_reason(self, silent: float) -> str:
        return (f"engine core process stopped answering (nothing for {silent:.1f}s, "
                f"limit {self.core_timeout:g}s)")

    def _check_step(self, busy_s: float) -> None:
        if busy_s > self.step_timeout:
            self._mark_dead(f"engine core step is stuck (one loop iteration has run for "
                            f"{busy_s:.1f}s, limit {self.step_timeout:g}s); it was killed")
            self._kill()

    def _on_eof(self) -> None:
        self.process.join(0.5)  # EOF: the process is gone or going; its exit code, if it can
        if self._stopped:
            self._mark_dead("engine shut down", log=False)
            return
        self._mark_dead(self._died_reason or (f"engine core process exited unexpectedly "
                                              f"(exit code {self.process.exitcode})"))

    def _mark_dead(self, reason: str, log: bool = True) -> None:
        with self._lock:
            if self._dead is not None:
                return
            self._dead = reason
        if log:
            logger.error("engine core is dead: %s", reason)
        self._unsent.clear()
        for future in self._hooks.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        self._streams.fail_all(EngineDeadError(reason))

    def _dispatch(self, message: FromCore) -> None:
        if isinstance(message, OutputBatch):
            self._on_batch(message)
        elif isinstance(message, RequestFailed):
            self._deliver(message.request_id, message.error)
        elif isinstance(message, HookResult):
            self._on_hook_result(message)
        elif isinstance(message, CoreAlive):
            self._check_step(message.loop_busy_s)
        elif isinstance(message, CoreDied):
            self._died_reason = message.reason

    def _on_batch(self, batch: OutputBatch) -> None:
        self._status = batch.status
        if batch.stats:
            self._last_progress = time.monotonic()
        if batch.stats and self.stats_callback is not None:
            try:
                for stats in batch.stats:
                    self.stats_callback(stats)
            except Exception:  # noqa: BLE001 - metrics must never stop the reader
                logger.exception("stats callback failed")
        self._deliver_all(batch.outputs)

    def _on_hook_result(self, result: HookResult) -> None:
        future = self._hooks.pop(result.call_id, None)
        if future is None:
            return
        if result.error is not None:
            future.set_exception(RuntimeError(f"hook failed in the engine core: {result.error}"))
        else:
            future.set_result(result.value)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._streams.deliver(request_id, item)

    def _deliver_all(self, outputs: tuple[RequestOutput, ...]) -> None:
        """Text and stop strings first (a stop string aborts the request in the core)."""
        ready = []
        for output in outputs:
            texts = self._texts.get(output.request_id)
            if texts is None:
                continue
            was_stopped = texts.stopped_here
            output = texts.process(output)
            if texts.stopped_here and not was_stopped and not output.finished:
                self.abort(output.request_id)  # a stop string ended it: free its blocks
            ready.append(output)
        self._streams.deliver_all(ready)
