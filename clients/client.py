"""`Client`: the synchronous HTTP client of any OpenAI-compatible server, loopserve first.

    with Client("http://localhost:8000", api_key=None) as client:
        out = client.complete("What is 12+30?", max_tokens=8, halt_threshold=0.05)
        out.text, out.compute.loops_per_layer
        for chunk in client.stream_chat("What is the capital of Veltria?"):
            print(chunk.text, end="")

Requests that get 429 or 503 (or cannot connect) are retried with backoff, waiting exactly
the server's Retry-After when it sends one; a stream is retried only before it starts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from clients import protocol
from clients.errors import APIStatusError
from clients.protocol import CHAT, COMPLETIONS, Message
from clients.retry import RetryPolicy
from clients.types import Chunk, Completion, Model, Usage


class Stream:
    """The chunks of one streamed response; `usage` is set once the usage chunk arrived.

    Iterate it once; it closes the connection when exhausted, on `close()` or on leaving a
    `with` block (closing early makes the server abort the request).
    """

    def __init__(self, response: httpx.Response, url: str) -> None:
        self._response = response
        self._url = url
        self.request_id = protocol.request_id(response)
        self.usage: Usage | None = None

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for line in self._response.iter_lines():
                if protocol.is_done(line):
                    break
                event = protocol.sse_event(line)
                if event is not None:
                    chunk = Chunk.from_json(event)
                    self.usage = chunk.usage or self.usage
                    yield chunk
        except httpx.HTTPError as error:
            raise protocol.transport_error(error, self._url) from error
        finally:
            self.close()

    def close(self) -> None:
        self._response.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """Completions, chat, models and health of one server; a context manager."""

    def __init__(self, base_url: str = "http://localhost:8000", *, api_key: str | None = None,
                 model: str | None = None, timeout: float = 600.0, connect_timeout: float = 10.0,
                 max_retries: int | None = None, retry: RetryPolicy | None = None,
                 headers: dict[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = protocol.api_root(base_url)
        self.model = model  # None: the server's default (loopserve serves one model)
        retry = retry or RetryPolicy()
        if max_retries is not None:
            retry = dataclasses.replace(retry, max_retries=max_retries)
        self.retry = retry
        self._http = httpx.Client(base_url=self.base_url,
                                  headers=protocol.headers(api_key, headers),
                                  timeout=httpx.Timeout(timeout, connect=connect_timeout),
                                  transport=transport)

    # ------------------------------------------------------------------ API
    def complete(self, prompt: str | list, **params: Any) -> Completion:
        """POST /v1/completions; `params` are the request's sampling and compute fields."""
        return self._post(COMPLETIONS, protocol.completion_body(prompt, self.model, params, False))

    def stream_complete(self, prompt: str | list, **params: Any) -> Stream:
        return self._stream(COMPLETIONS,
                            protocol.completion_body(prompt, self.model, params, True))

    def chat(self, messages: list[Message] | str, **params: Any) -> Completion:
        """POST /v1/chat/completions; a bare string is one user message."""
        return self._post(CHAT, protocol.chat_body(messages, self.model, params, False))

    def stream_chat(self, messages: list[Message] | str, **params: Any) -> Stream:
        return self._stream(CHAT, protocol.chat_body(messages, self.model, params, True))

    def models(self) -> list[Model]:
        data = protocol.response_json(self._retrying(lambda: self._send("GET", "/v1/models")))
        return [Model(id=str(m.get("id", "")), raw=m) for m in data.get("data") or ()]

    def health(self) -> bool:
        """True when GET /health answers 200; False on any error status or no answer."""
        try:
            return self._http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> str:
        """The Prometheus text of GET /metrics."""
        response = self._retrying(lambda: self._send("GET", "/metrics"))
        return response.text

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ transport
    def _post(self, path: str, body: dict[str, Any]) -> Completion:
        response = self._retrying(lambda: self._send("POST", path, body))
        return Completion.from_json(protocol.response_json(response),
                                    protocol.request_id(response))

    def _stream(self, path: str, body: dict[str, Any]) -> Stream:
        response = self._retrying(lambda: self._send("POST", path, body, stream=True))
        return Stream(response, self.base_url + path)

    def _send(self, method: str, path: str, body: dict[str, Any] | None = None,
              stream: bool = False) -> httpx.Response:
        """One attempt; an error status is raised typed, with its body read."""
        request = self._http.build_request(method, path, json=body)
        response = self._http.send(request, stream=stream)
        if response.status_code >= 400:
            response.read()
            response.close()
            protocol.raise_for_status(response)
        return response

    def _retrying(self, send: Callable[[], httpx.Response]) -> httpx.Response:
        attempt = 0
        while True:
            try:
                return send()
            except (APIStatusError, httpx.HTTPError) as error:
                if not self.retry.should_retry(error, attempt):
                    if isinstance(error, httpx.HTTPError):
                        raise protocol.transport_error(error, self.base_url) from error
                    raise
                time.sleep(self.retry.delay(error, attempt))
                attempt += 1
