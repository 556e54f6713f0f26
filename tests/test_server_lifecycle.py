"""Production behaviour against a real server: client disconnects (streaming or not) abort
the request and free its KV blocks, a full queue gives 429 while every accepted request
completes, the request deadline, /health on a dead or stalled engine, and SIGTERM draining
(a `loopserve serve` subprocess)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server_helpers import LiveServer, make_checkpoint, sse_events

REPO = Path(__file__).resolve().parent.parent
LONG = {"prompt": "a long answer", "max_tokens": 200, "ignore_eos": True}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("server-lifecycle"))


def slow_steps(server: LiveServer, seconds: float) -> None:
    """Make every engine step take at least `seconds` (generation outlasts the client)."""
    server.in_core("slow_steps", seconds)


class Gate:
    """A file the engine core's held steps wait for: `set()` creates it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self) -> None:
        self.path.touch()


def held_steps(server: LiveServer, tmp_path: Path) -> Gate:
    """Hold every engine step until the returned gate is set."""
    gate = Gate(tmp_path / "gate")
    server.in_core("hold_steps", str(gate.path))
    return gate


def failures(server: LiveServer, reason: str) -> float:
    return server.state.metrics.failure.labels(server.state.model_name, reason)._value.get()


def test_disconnect_mid_stream_aborts_and_frees_blocks(checkpoint):
    with LiveServer(checkpoint) as server, httpx.Client(base_url=server.url) as http:
        slow_steps(server, 0.01)
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            received = 0
            for line in response.iter_lines():
                received += line.startswith("data: ")
                if received == 3:
                    break  # leaving the block closes the connection mid-stream
        server.assert_no_blocks_owned()
        assert failures(server, "client_disconnect") == 1


def test_disconnect_while_waiting_for_a_whole_response_aborts(checkpoint):
    with LiveServer(checkpoint) as server:
        slow_steps(server, 0.01)
        with httpx.Client(base_url=server.url, timeout=0.3) as http, \
                pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=LONG)
        server.assert_no_blocks_owned()
        assert failures(server, "client_disconnect") == 1


def test_full_queue_gives_429_and_every_accepted_request_completes(checkpoint, tmp_path):
    with LiveServer(checkpoint, max_queue=3) as server:
        gate = held_steps(server, tmp_path)

        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
                body = {"prompt": "queued", "max_tokens": 4, "ignore_eos": True}
                tasks = [asyncio.ensure_future(http.post("/v1/completions", json=body))
                         for _ in range(10)]
                while sum(t.done() for t in tasks) < 7:  # the rejected ones answer at once
                    await asyncio.sleep(0.01)
                gate.set()
                return await asyncio.gather(*tasks)

        responses = asyncio.run(main())
        rejected = [r for r in responses if r.status_code == 429]
        accepted = [r for r in responses if r.status_code == 200]
        assert len(rejected) == 7 and len(accepted) == 3
        for response in rejected:
            assert response.json()["error"]["type"] == "rate_limit_error"
            assert response.headers["retry-after"] == "1"
        assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in accepted)
        assert failures(server, "queue_full") == 7
        server.assert_no_blocks_owned()


def test_request_deadline_aborts_streaming_or_not(checkpoint):
    with LiveServer(checkpoint, request_timeout=0.4) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        slow_steps(server, 0.01)
        response = http.post("/v1/completions", json=LONG)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "request_timeout"
        with http.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "go"}], "max_tokens": 200,
                "ignore_eos": True, "stream": True}) as stream:
            events = sse_events(stream.iter_lines())
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["type"] == "timeout_error"
        assert len(events) > 3  # some content came before the deadline
        server.assert_no_blocks_owned()
        assert failures(server, "timeout") == 2


def test_health_fails_when_the_engine_dies(checkpoint):
    with LiveServer(checkpoint) as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/health").status_code == 200

        server.in_core("break_steps", "device fell off")
        response = http.post("/v1/completions", json={"prompt": "x"})
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "service_unavailable"
        health = http.get("/health")
        assert health.status_code == 503 and "device fell off" in health.json()["error"]["message"]
        assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 503


def test_health_fails_while_the_engine_is_stalled(checkpoint, tmp_path):
    with LiveServer(checkpoint, stall_timeout=0.2) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        gate = held_steps(server, tmp_path)
        worker = threading.Thread(target=http.post, args=("/v1/completions",),
                                  kwargs={"json": {"prompt": "x", "max_tokens": 2}})
        worker.start()
        time.sleep(0.5)
        stalled = http.get("/health")
        assert stalled.status_code == 503 and "stalled" in stalled.json()["error"]["message"]
        gate.set()
        worker.join(10)
        assert http.get("/health").status_code == 200


def test_health_fails_while_steps_run_but_compute_nothing(checkpoint, tmp_path):
    """The livelock shape: the loop keeps stepping, every step schedules nothing."""
    with LiveServer(checkpoint, stall_timeout=0.3) as server, \
            httpx.Client(base_url=server.url, timeout=30) as http:
        gate = Gate(tmp_path / "gate")
        server.in_core("schedule_nothing_until", str(gate.path))
        worker = threading.Thread(target=http.post, args=("/v1/completions",),
                                  kwargs={"json": {"prompt": "x", "max_tokens": 2}})
        worker.start()
        time.sleep(0.8)
        stalled = http.get("/health")
        assert stalled.status_code == 503 and "stalled" in stalled.json()["error"]["message"]
        assert server.in_core("num_steps") > 10  # empty steps did run
        gate.set()
        worker.join(10)
        assert http.get("/health").status_code == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health").status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError("the server did not become healthy")


def test_sigterm_drains_then_exits(checkpoint):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "LOOPSERVE_PORT": str(port),
           "LOOPSERVE_SERVED_MODEL_NAME": "from-env", "LOOPSERVE_NUM_KV_BLOCKS": "128"}
    proc = subprocess.Popen(
        [sys.executable, "loopserve_cli.py", "serve", "--model", str(checkpoint), "--host",
         "127.0.0.1", "--block-size", "4", "--shutdown-timeout", "30"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(url, proc)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "from-env"
        body = {"prompt": "drain me", "max_tokens": 240, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            health = httpx.get(f"{url}/health")
            assert health.status_code == 503 and health.json()["error"]["code"] == "draining"
            late = httpx.post(f"{url}/v1/completions", json={"prompt": "late"})
            assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_serve_without_a_checkpoint_fails_clearly(tmp_path, capsys):
    from server.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "config.json is missing" in capsys.readouterr().err


def test_flags_come_from_the_environment(monkeypatch):
    from server.cli import build_parser, settings_from

    monkeypatch.setenv("LOOPSERVE_API_KEY", "a,b")
    monkeypatch.setenv("LOOPSERVE_MAX_QUEUE", "7")
    monkeypatch.setenv("LOOPSERVE_NO_PREFIX_CACHING", "true")
    monkeypatch.setenv("LOOPSERVE_MODE", "max_depth")
    settings, config = settings_from(build_parser().parse_args(["--port", "9000"]))
    assert settings.api_keys == ("a", "b") and settings.max_queue == 7
    assert settings.port == 9000
    assert not config.enable_prefix_caching and config.mode == "max_depth"
    monkeypatch.delenv("LOOPSERVE_MAX_QUEUE")  # without it, the flag's default again
    assert settings_from(build_parser().parse_args([]))[0].max_queue != 7


def test_engine_flags_reach_the_engine_config(capsys):
    from server.cli import build_parser, settings_from

    args = build_parser().parse_args(["--attention-backend", "flex", "--compile-chains"])
    _, config = settings_from(args)
    assert config.attention_backend == "flex" and config.compile_chains
    assert settings_from(build_parser().parse_args([]))[1].attention_backend == "gather"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--attention-backend", "paged"])
    assert "invalid choice: 'paged'" in capsys.readouterr().err
