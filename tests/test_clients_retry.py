"""Retries against a real HTTP server of this test's own that answers 429 (or 503) with
Retry-After a few times, then 200: both clients wait what the server said, then succeed;
a client out of retries raises the typed error with the server's message. The same plain
server (no loopserve extras) shows timeouts, and that `loopserve bench` works with any
OpenAI-compatible server and counts its 429s by type."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clients import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    Client,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
)
from clients.bench import main as bench_main

COMPLETION = {"id": "cmpl-1", "model": "m", "object": "text_completion",
              "choices": [{"index": 0, "text": "42", "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
CHUNKS = [{"id": "c", "model": "m", "choices": [{"index": 0, "text": "4"}]},
          {"id": "c", "model": "m", "choices": [{"index": 0, "text": "2",
                                                 "finish_reason": "stop"}]},
          {"id": "c", "model": "m", "choices": [], "usage": COMPLETION["usage"]}]
RETRY_AFTER = 0.2


class Overloaded(ThreadingHTTPServer):
    """Answers the first `failures` POSTs with `status` + Retry-After, then 200."""

    daemon_threads = True

    def __init__(self, failures: int, status: int = 429, delay: float = 0.0,
                 truncate: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.failures, self.status, self.delay = failures, status, delay
        self.truncate = truncate  # streams stop after their first event (a dropped connection)
        self.arrivals: list[float] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out and left: the write fails, as it should


class Handler(BaseHTTPRequestHandler):
    server: Overloaded

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.arrivals.append(time.monotonic())
        time.sleep(self.server.delay)
        if len(self.server.arrivals) <= self.server.failures:
            self.reply(self.server.status, {"error": {
                "message": "the waiting queue is full; retry later", "type": "rate_limit_error",
                "param": None, "code": "queue_full"}}, {"Retry-After": str(RETRY_AFTER)})
        elif body.get("stream"):
            events = "".join(f"data: {json.dumps(c)}\n\n" for c in CHUNKS) + "data: [DONE]\n\n"
            self.reply(200, events.encode(), {"Content-Type": "text/event-stream"})
        else:
            self.reply(200, COMPLETION)

    def reply(self, status: int, body: dict | bytes, headers: dict[str, str] | None = None
              ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.server.truncate and isinstance(body, bytes):
            data = data[:data.index(b"\n\n") + 2]
            self.close_connection = True
        self.wfile.write(data)


def serve(failures: int, status: int = 429, delay: float = 0.0, truncate: bool = False
          ) -> Iterator[Overloaded]:
    server = Overloaded(failures, status, delay, truncate)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def twice_overloaded():
    yield from serve(failures=2)


def gaps(server: Overloaded) -> list[float]:
    return [b - a for a, b in zip(server.arrivals, server.arrivals[1:], strict=False)]


def test_sync_client_waits_retry_after_then_succeeds(twice_overloaded):
    with Client(twice_overloaded.url, max_retries=3) as client:
        out = client.complete("What is 12+30?")
    assert out.text == "42" and out.usage.completion_tokens == 1
    assert len(twice_overloaded.arrivals) == 3
    assert all(gap >= RETRY_AFTER * 0.9 for gap in gaps(twice_overloaded))


def test_async_stream_is_retried_before_it_starts(twice_overloaded):
    async def run() -> tuple[str, int]:
        async with AsyncClient(twice_overloaded.url, max_retries=3) as client:
            stream = await client.stream_complete("What is 12+30?")
            text = "".join([chunk.text async for chunk in stream])
            return text, stream.usage.total_tokens

    assert asyncio.run(run()) == ("42", 4)
    assert len(twice_overloaded.arrivals) == 3
    assert all(gap >= RETRY_AFTER * 0.9 for gap in gaps(twice_overloaded))


def test_out_of_retries_raises_the_typed_error_with_the_server_message(twice_overloaded):
    with Client(twice_overloaded.url, max_retries=1) as client, pytest.raises(
            RateLimitError, match="queue is full") as info:
        client.complete("x")
    assert info.value.status_code == 429 and info.value.code == "queue_full"
    assert info.value.retry_after == RETRY_AFTER
    assert len(twice_overloaded.arrivals) == 2


def test_503_is_retried_and_typed():
    for server in serve(failures=5, status=503):
        policy = RetryPolicy(max_retries=2, initial_backoff=0.01, max_backoff=0.02)
        with Client(server.url, retry=policy) as client, pytest.raises(
                ServiceUnavailableError):
            client.stream_chat("hi")
        assert len(server.arrivals) == 3


def test_timeout_is_typed():
    for server in serve(failures=0, delay=0.5):
        with Client(server.url, timeout=0.05) as client, pytest.raises(APITimeoutError):
            client.complete("x")
        assert len(server.arrivals) == 1  # a read timeout is not retried: it may have run


def test_a_dropped_stream_is_a_connection_error():
    for server in serve(failures=0, truncate=True):
        with Client(server.url) as client:
            stream = client.stream_complete("x")
            chunks = []
            with pytest.raises(APIConnectionError, match="RemoteProtocolError"):
                chunks.extend(stream)
            assert [c.text for c in chunks] == ["4"]


def test_bench_against_a_plain_openai_server(twice_overloaded, tmp_path):
    path = tmp_path / "plain.json"
    assert bench_main(["bench", "--url", f"{twice_overloaded.url}/v1", "--model", "m",
                       "--num-prompts", "5", "--concurrency", "1", "--result-file", str(path),
                       "--no-progress"]) == 0
    result = json.loads(path.read_text())
    assert (result["completed"], result["failed"]) == (3, 2)
    assert result["errors_by_type"] == {"429 rate_limit_error": 2}
    assert result["total_output_tokens"] == 3 and result["requests_with_compute"] == 0
