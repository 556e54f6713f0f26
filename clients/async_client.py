"""`AsyncClient`: the asyncio twin of `Client` (same methods, awaited; streams are async
iterators). The load generator sends its requests through it.

    async with AsyncClient("http://localhost:8000") as client:
        stream = await client.stream_complete("3+4*2=", max_tokens=8)
        async for chunk in stream:
            print(chunk.text, end="")
        stream.usage.compute.compute_saved
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from clients import protocol
from clients.errors import APIStatusError
from clients.protocol import CHAT, COMPLETIONS, Message
from clients.retry import RetryPolicy
from clients.types import Chunk, Completion, Model, Usage


class AsyncStream:
    """The chunks of one streamed response, as an async iterator; see `clients.Stream`."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self._response = response
        self._url = url
        self.request_id = protocol.request_id(response)
        self.usage: Usage | None = None

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            async for line in self._response.aiter_lines():
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
            await self.aclose()

    async def aclose(self) -> None:
        await self._response.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncClient:
    """Completions, chat, models and health of one server; an async context manager."""

    def __init__(self, base_url: str = "http://localhost:8000", *, api_key: str | None = None,
                 model: str | None = None, timeout: float = 600.0, connect_timeout: float = 10.0,
                 max_retries: int | None = None, retry: RetryPolicy | None = None,
                 headers: dict[str, str] | None = None, max_connections: int = 1000,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = protocol.api_root(base_url)
        self.model = model
        retry = retry or RetryPolicy()
        if max_retries is not None:
            retry = dataclasses.replace(retry, max_retries=max_retries)
        self.retry = retry
        limits = httpx.Limits(max_connections=max_connections,
                              max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=self.base_url,
                                       headers=protocol.headers(api_key, headers),
                                       timeout=httpx.Timeout(timeout, connect=connect_timeout),
                                       limits=limits, transport=transport)

    # ------------------------------------------------------------------ API
    async def complete(self, prompt: str | list, **params: Any) -> Completion:
        return await self._post(COMPLETIONS,
                                protocol.completion_body(prompt, self.model, params, False))

    async def stream_complete(self, prompt: str | list, **params: Any) -> AsyncStream:
        return await self._stream(COMPLETIONS,
                                  protocol.completion_body(prompt, self.model, params, True))

    async def chat(self, messages: list[Message] | str, **params: Any) -> Completion:
        return await self._post(CHAT, protocol.chat_body(messages, self.model, params, False))

    async def stream_chat(self, messages: list[Message] | str, **params: Any) -> AsyncStream:
        return await self._stream(CHAT, protocol.chat_body(messages, self.model, params, True))

    async def models(self) -> list[Model]:
        response = await self._retrying(lambda: self._send("GET", "/v1/models"))
        data = protocol.response_json(response)
        return [Model(id=str(m.get("id", "")), raw=m) for m in data.get("data") or ()]

    async def health(self) -> bool:
        try:
            return (await self._http.get("/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def metrics(self) -> str:
        return (await self._retrying(lambda: self._send("GET", "/metrics"))).text

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ transport
    async def _post(self, path: str, body: dict[str, Any]) -> Completion:
        response = await self._retrying(lambda: self._send("POST", path, body))
        return Completion.from_json(protocol.response_json(response),
                                    protocol.request_id(response))

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncStream:
        response = await self._retrying(lambda: self._send("POST", path, body, stream=True))
        return AsyncStream(response, self.base_url + path)

    async def _send(self, method: str, path: str, body: dict[str, Any] | None = None,
                    stream: bool = False) -> httpx.Response:
        request = self._http.build_request(method, path, json=body)
        response = await self._http.send(request, stream=stream)
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            protocol.raise_for_status(response)
        return response

    async def _retrying(self, send: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
        attempt = 0
        while True:
            try:
                return await send()
            except (APIStatusError, httpx.HTTPError) as error:
                if not self.retry.should_retry(error, attempt):
                    if isinstance(error, httpx.HTTPError):
                        raise protocol.transport_error(error, self.base_url) from error
                    raise
                await asyncio.sleep(self.retry.delay(error, attempt))
                attempt += 1
