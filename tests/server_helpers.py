"""Helpers for the server tests: a tiny checkpoint on disk, a real uvicorn server on a free
local port in a background thread (its engine core in a process of its own, as `loopserve
serve` runs it), SSE parsing, and waiting for the engine to go idle."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn

from engine import EngineConfig, save_model
from server.app import build_engine, create_app
from server.settings import ServerSettings
from server.state import ServerState
from tests.helpers import make_model

MODEL_NAME = "tiny-test"


def make_checkpoint(directory: Path) -> Path:
    """The tests' model (byte tokenizer: the checkpoint has no tokenizer.json)."""
    return save_model(make_model(seed=3), directory / MODEL_NAME)


def engine_config(**overrides) -> EngineConfig:
    options = {"num_kv_blocks": 256, "block_size": 4, "max_num_seqs": 16, "device": "cpu"}
    return EngineConfig(**{**options, **overrides})


class LiveServer:
    """`create_app` on uvicorn in a thread; `with LiveServer(...) as server: server.url`."""

    def __init__(self, checkpoint: Path, config: EngineConfig | None = None,
                 **settings) -> None:
        settings = ServerSettings(model=str(checkpoint), **settings)
        engine, name = build_engine(settings, config or engine_config())
        self.app = create_app(engine, settings, name)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        uv_config = uvicorn.Config(self.app, log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(uv_config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def state(self) -> ServerState:
        return self.app.state.server

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()
        self.state.engine.shutdown()  # done by the app's lifespan unless it never started

    def in_core(self, hook: str, *args):
        """Run `tests.core_hooks.<hook>(llm_engine, *args)` in the engine-core process."""
        return self.state.engine.call_in_core(f"tests.core_hooks:{hook}", *args)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until no request is in flight, waiting or running in the engine."""
        engine = self.state.engine
        deadline = time.monotonic() + timeout
        while engine.num_in_flight or engine.num_waiting or not self.in_core("is_idle"):
            if time.monotonic() > deadline:
                raise AssertionError("the engine did not go idle")
            time.sleep(0.01)

    def assert_no_blocks_owned(self) -> None:
        self.wait_idle()
        assert self.in_core("block_pool") == (0.0, 0)


def sse_events(lines: Iterator[str]) -> list[str]:
    """The data of each event of an SSE body, asserting the framing (`data: ` + blank line)."""
    events, pending = [], None
    for line in lines:
        if line == "":
            assert pending is not None, "a blank line without an event"
            events.append(pending)
            pending = None
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        assert pending is None, "one data line per event"
        pending = line[len("data: "):]
    assert pending is None, "the last event is not terminated by a blank line"
    return events


def stream_json(client: httpx.Client, path: str, body: dict, **kwargs) -> list[dict]:
    """POST a streaming request; the chunks as JSON (asserting it ends with [DONE])."""
    with client.stream("POST", path, json={**body, "stream": True}, **kwargs) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]
