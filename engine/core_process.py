"""The engine-core process: it owns the model, the KV cache, the scheduler and the step loop.

`run_core` is the process's entry point (spawned by `EngineCoreClient`). It loads the model,
answers `CoreReady` (or `CoreFailed` with the load error), then loops: take every command
waiting on the socket, run one engine step while requests are unfinished, and send one
`OutputBatch` with the deltas of every request the step touched, the statistics of the steps
since the last batch and the core's status. A step with no delta (every request it ran
wants only its final output, `OutputKind.FINAL`) sends nothing unless its statistics have
waited `STATS_SECONDS` or the core goes idle: the API process is not woken every step for
metrics it reads once per scrape. The loop writes its messages itself, under a lock it
shares with the heartbeat: a sender thread, tried, cost the step 7-10% at concurrency 1
(each torch op releases the GIL, and a second runnable thread turns every release into a
hand-off).
A heartbeat thread sends `CoreAlive` whenever nothing went out for
`HEARTBEAT_SECONDS` (idle, between empty steps, or in the middle of a long one), with
how long the loop has been in its current iteration: the process is known to run even
while one step takes minutes (a long prefill on a slow host), and the API
process judges the step itself against its own, longer limit.

The core sends token ids only: the API process detokenizes and applies stop strings
(`engine.detokenizer`), and aborts a request here once a stop string ended it.

The core ignores SIGINT and SIGTERM (the API process drains through it and then stops it)
and dies with its parent: on Linux by PR_SET_PDEATHSIG, everywhere by the socket's EOF.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import pickle
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

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
from engine.core_wire import BlockingWire, socket_of
from engine.engine_config import EngineConfig
from engine.errors import InvalidRequestError
from engine.gc_freeze import freeze_startup_heap
from engine.llm_engine import LLMEngine, StepStats
from engine.request import RequestOutput

logger = logging.getLogger("loopserve.engine")

HEARTBEAT_SECONDS = 0.1
STATS_SECONDS = HEARTBEAT_SECONDS / 2  # the oldest step statistics held back, at most
PR_SET_PDEATHSIG = 1


def run_core(conn: Connection, model_dir: str | None, config: EngineConfig,
             parent_pid: int) -> None:
    """Entry point of the engine-core process."""
    _detach_from_signals(parent_pid)
    logging.basicConfig(level="INFO", stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s[core]: %(message)s")
    wire = BlockingWire(socket_of(conn))
    try:
        llm = LLMEngine.from_pretrained(model_dir, config, detokenize=False)
    except BaseException as exc:  # noqa: BLE001 - every load error goes to the API process
        wire.send(encode(CoreFailed(_picklable(exc))))
        return
    frozen = freeze_startup_heap()
    logger.debug("%d start-up objects frozen out of the garbage collector's scans", frozen)
    wire.send(encode(CoreReady(os.getpid(), llm.processor, llm.config, llm.max_model_len)))
    EngineCore(llm, wire).run()


def _detach_from_signals(parent_pid: int) -> None:
    """Ctrl-C reaches the whole process group: the API process decides when the core stops.
    (The parent may itself be PID 1, in a container: compare with its pid, not with 1.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above ran
        os._exit(1)


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception must cross, if only as text
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class EngineCore:
    """The step loop on the core's side of the socket."""

    def __init__(self, llm: LLMEngine, wire: BlockingWire) -> None:
        self.llm = llm
        self.wire = wire
        self.adds_seen = 0
        self.stop = False
        self.last_sent = 0.0
        self.iteration_started = time.monotonic()
        self._write_lock = threading.Lock()  # one message at a time on the socket
        self._stats: list[StepStats] = []  # of the steps since the last batch
        self._stats_since = 0.0  # when the oldest of them was kept
        llm.stats_callback = self._keep_stats

    def _keep_stats(self, stats: StepStats) -> None:
        if not self._stats:
            self._stats_since = time.monotonic()
        self._stats.append(stats)

    def run(self) -> None:
        threading.Thread(target=self._heartbeat, name="loopserve-core-heartbeat",
                         daemon=True).start()
        try:
            while not self.stop:
                self.iteration_started = time.monotonic()
                self._loop_once()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            logger.info("the API process is gone; the engine core exits")
        except BaseException as exc:  # noqa: BLE001 - the API process must learn why
            logger.exception("engine core loop died")
            self._send_quietly(CoreDied(f"engine loop died: {exc!r}"))
        finally:
            self.stop = True  # the heartbeat too

    def _loop_once(self) -> None:
        busy = self.llm.has_unfinished()
        outputs, added = self._take_commands(0.0 if busy else HEARTBEAT_SECONDS)
        if outputs or added:  # abort finals, and an exact waiting count for the queue bound
            self._send_batch(outputs)
        if self.stop or not self.llm.has_unfinished():
            return  # idle: the heartbeat thread tells the API process the core is alive
        outputs = self.llm.step()
        if outputs or self._stats_due():  # an empty step changed no status
            self._send_batch(outputs)

    def _stats_due(self) -> bool:
        """Held statistics go out once they are old enough, or when the core goes idle."""
        if not self._stats:
            return False
        return (time.monotonic() - self._stats_since >= STATS_SECONDS
                or not self.llm.has_unfinished())

    def _heartbeat_due(self) -> bool:
        return time.monotonic() - self.last_sent >= HEARTBEAT_SECONDS

    def _heartbeat(self) -> None:
        """Thread: `CoreAlive` whenever the loop has sent nothing for HEARTBEAT_SECONDS."""
        while not self.stop:
            time.sleep(HEARTBEAT_SECONDS / 2)
            if self._heartbeat_due():
                try:
                    self._send(CoreAlive(time.monotonic() - self.iteration_started))
                except OSError:
                    return  # the API process is gone; the loop notices too

    # ------------------------------------------------------------------ commands
    def _take_commands(self, timeout: float) -> tuple[list[RequestOutput], bool]:
        outputs: list[RequestOutput] = []
        added = False
        wait = timeout
        while not self.stop and self.wire.poll(wait):
            wait = 0.0
            message: ToCore = decode(self.wire.recv())
            for command in (message.commands if isinstance(message, CommandBatch)
                            else (message,)):
                added |= self._apply(command, outputs)
        return outputs, added

    def _apply(self, command: ToCore, outputs: list[RequestOutput]) -> bool:
        """Apply one command (abort finals go to `outputs`); True if it added a request."""
        if self.stop:
            return False
        if isinstance(command, AddRequest):
            self._add(command)
            return True
        if isinstance(command, AbortRequest):
            final = self.llm.abort_request(command.request_id)
            if final is not None:
                outputs.append(final)
        elif isinstance(command, CallHook):
            self._call_hook(command)
        elif isinstance(command, Shutdown):
            self.stop = True
        return False

    def _add(self, command: AddRequest) -> None:
        self.adds_seen += 1
        try:
            self.llm.add_request(command.request)
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the loop
            if not isinstance(exc, InvalidRequestError):
                logger.exception("request %s could not be added", command.request.request_id)
            self._send(RequestFailed(command.request.request_id, _picklable(exc)))

    def _call_hook(self, command: CallHook) -> None:
        module, _, name = command.target.partition(":")
        try:
            value = getattr(importlib.import_module(module), name)(self.llm, *command.args)
            self._send(HookResult(command.call_id, value))
        except Exception as exc:  # noqa: BLE001 - a test hook's error goes back to the test
            self._send(HookResult(command.call_id, error=f"{type(exc).__name__}: {exc}"))

    # ------------------------------------------------------------------ sending
    def _status(self) -> CoreStatus:
        llm = self.llm
        return CoreStatus(num_waiting=llm.num_waiting, num_running=llm.num_running,
                          kv_cache_usage=llm.block_manager.usage(), adds_seen=self.adds_seen,
                          num_steps=llm.num_steps)

    def _send_batch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            output.prompt_token_ids = []  # the API process has them: not again every token
        stats, self._stats = tuple(self._stats), []
        self._send(OutputBatch(tuple(outputs), stats, self._status()))

    def _send(self, message: FromCore) -> None:
        """Write one message (from the loop or the heartbeat thread). A full pipe blocks
        here, as backpressure; an OSError means the API process is gone, and stops the
        loop (the heartbeat's send raises it there too)."""
        data = encode(message)
        try:
            with self._write_lock:
                self.wire.send(data)
        except OSError:
            self.stop = True
            raise
        self.last_sent = time.monotonic()

    def _send_quietly(self, message: FromCore) -> None:
        with contextlib.suppress(OSError):  # the API process may be gone already
            self._send(message)
