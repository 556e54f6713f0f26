"""Pure ASGI middleware (no buffering of streamed responses, disconnects pass through):

- `RequestContextMiddleware`: X-Request-Id (echoed when sane, else generated), arrival time,
  one JSON access-log line per request, and a 500 error object for an unexpected exception;
- `ApiKeyMiddleware`: `Authorization: Bearer <key>` compared in constant time (401 otherwise);
  /health and /metrics stay open;
- `BodyLimitMiddleware`: 413 for a request body over the limit, declared or streamed.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_body

access_logger = logging.getLogger("loopserve.access")
logger = logging.getLogger("loopserve.server")

REQUEST_ID_HEADER = b"x-request-id"
# short enough to be a Prometheus exemplar label (128 characters for names and values)
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,100}")
OPEN_PATHS = frozenset({"/health", "/metrics"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


async def send_error(send: Send, status: int, message: str, code: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, REQUEST_ID_HEADER)
        request_id = given if given and _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, arrival=time.monotonic(), log={})
        response: dict[str, Any] = {"status": None}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                message["headers"] = [*message.get("headers", ()),
                                      (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - a bug must still answer with an error object
            logger.exception("unhandled error in request %s", request_id)
            if response["status"] is None:
                await send_error(send_with_id, 500, "internal server error",
                                 code="internal_error")
        finally:
            if self.access_log:
                self._log(scope, state, response["status"])

    @staticmethod
    def _log(scope: Scope, state: dict[str, Any], status: int | None) -> None:
        record = {"ts": round(time.time(), 3), "request_id": state["request_id"],
                  "method": scope.get("method"), "path": scope.get("path"),
                  "status": status if status is not None else 499,
                  "latency_s": round(time.monotonic() - state["arrival"], 6), **state["log"]}
        access_logger.info(json.dumps(record, default=str))


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = [key.encode() for key in api_keys]

    def _authorized(self, scope: Scope) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode("latin-1")
        matched = False
        for key in self.keys:  # every key is compared: the time does not say which matched
            matched |= hmac.compare_digest(given, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self.keys or scope.get("path") in OPEN_PATHS
                or self._authorized(scope)):
            await self.app(scope, receive, send)
            return
        await send_error(send, 401, "missing or invalid API key: send 'Authorization: Bearer "
                                    "<key>'", code="invalid_api_key",
                         headers=[(b"www-authenticate", b"Bearer")])


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Reads the whole body first (up to the limit) and replays it to the app; later receive
    calls go to the server, so the app still sees the client's disconnect."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        try:
            body = await self._read(receive)
        except _TooLarge:
            await self._too_large(send)
            return
        if body is None:
            return  # the client left before sending its body
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The body; None when the client left first; _TooLarge over the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send) -> None:
        await send_error(send, 413, f"the request body is larger than {self.max_bytes} bytes",
                         code="request_too_large")
