"""The messages between the API process and the engine-core process, and their wire format.

Every message is a frozen dataclass; on the wire it is `pickle((PROTOCOL_VERSION, message))`
over a `multiprocessing` pipe (one `send_bytes` per message). Pickle of these small frozen
objects costs a few microseconds per message and needs no dependency; the version makes a
mismatched pair of processes fail loudly instead of misreading each other.

API -> core: a `CommandBatch` of `AddRequest`, `AbortRequest`, `CallHook` (tests),
`Shutdown`.
Core -> API: `CoreReady` or `CoreFailed` once at start-up; then `OutputBatch` (every
touched request's delta of one step, the statistics of every step since the last batch, and
the core's status),
`CoreAlive` (from the core's heartbeat thread, whenever nothing else
went out for a while, even in the middle of a long step), `RequestFailed`, `HookResult`,
and `CoreDied` before the core exits because its loop raised.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

from engine.engine_config import EngineConfig
from engine.input_processor import InputProcessor, PreparedRequest
from engine.llm_engine import StepStats
from engine.request import RequestOutput

PROTOCOL_VERSION = 3


class ProtocolError(RuntimeError):
    """A message that is not of this protocol version (the two processes differ)."""


# ---------------------------------------------------------------------- API -> core
@dataclasses.dataclass(frozen=True)
class AddRequest:
    request: PreparedRequest


@dataclasses.dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclasses.dataclass(frozen=True)
class CallHook:
    """Run `module:function(llm_engine, *args)` on the core's loop (tests use it to slow,
    hold or break steps and to inspect the KV pool); the answer is a `HookResult`."""

    call_id: int
    target: str
    args: tuple[Any, ...] = ()


@dataclasses.dataclass(frozen=True)
class Shutdown:
    pass


@dataclasses.dataclass(frozen=True)
class CommandBatch:
    """The commands queued since the last send, in order, as one message: the prompts of
    one HTTP request reach the core together and are scheduled in the same step."""

    commands: tuple[AddRequest | AbortRequest | CallHook | Shutdown, ...]


# ---------------------------------------------------------------------- core -> API
@dataclasses.dataclass(frozen=True)
class CoreReady:
    pid: int
    processor: InputProcessor
    config: EngineConfig
    max_model_len: int


@dataclasses.dataclass(frozen=True)
class CoreFailed:
    """Start-up failed; `error` is the exception (ConfigError, CheckpointError, ...)."""

    error: BaseException


@dataclasses.dataclass(frozen=True)
class CoreStatus:
    num_waiting: int
    num_running: int
    kv_cache_usage: float
    adds_seen: int  # AddRequest messages the core has taken, since it started
    num_steps: int  # engine steps run, empty ones included


@dataclasses.dataclass(frozen=True)
class OutputBatch:
    outputs: tuple[RequestOutput, ...]
    stats: tuple[StepStats, ...]  # oldest first; empty when no step ran since the last batch
    status: CoreStatus


@dataclasses.dataclass(frozen=True)
class RequestFailed:
    request_id: str
    error: BaseException


@dataclasses.dataclass(frozen=True)
class HookResult:
    call_id: int
    value: Any = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class CoreAlive:
    """The core process runs; its step loop has been in its current iteration this long."""

    loop_busy_s: float


@dataclasses.dataclass(frozen=True)
class CoreDied:
    reason: str


ToCore = AddRequest | AbortRequest | CallHook | Shutdown | CommandBatch
FromCore = (CoreReady | CoreFailed | OutputBatch | RequestFailed | HookResult | CoreAlive
            | CoreDied)


def encode(message: ToCore | FromCore) -> bytes:
    return pickle.dumps((PROTOCOL_VERSION, message), protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> ToCore | FromCore:
    version, message = pickle.loads(data)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"engine-core protocol version {version} received, this process "
                            f"speaks version {PROTOCOL_VERSION}")
    return message
