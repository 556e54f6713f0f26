"""Every error the server sends is an OpenAI error object with the status of DESIGN section 6.

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

`APIError` is raised by routes; the engine's typed errors, FastAPI's validation errors and
Starlette's HTTP errors (unknown route, wrong method) are mapped here, so that no client
input reaches the default handlers (FastAPI's 422, Starlette's plain-text 404).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.errors import (
    EngineDeadError,
    EngineDrainingError,
    InvalidRequestError,
    QueueFullError,
)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
    504: "timeout_error",
}
RETRY_AFTER_SECONDS = 1  # what a 429 tells the client to wait
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away first" (never sent)
FASTAPI_BODY_ERROR = "There was an error parsing the body"  # e.g. a body that is not UTF-8


class ClientDisconnected(Exception):
    """The client closed the connection before the response was complete."""


class APIError(Exception):
    """An HTTP error with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None
               ) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"),
                      "param": param, "code": code}}


def from_engine_error(exc: Exception) -> APIError:
    """The engine's typed errors as HTTP errors (anything else is a server bug: 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, exc.message, exc.param, code=exc.code)
    if isinstance(exc, QueueFullError):
        return APIError(429, f"{exc}; retry later", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, EngineDrainingError):
        return APIError(503, str(exc), code="draining")
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_unavailable")
    return APIError(500, "internal server error", code="internal_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 as a 400 naming the first offending field."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    path = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not path:
        return APIError(400, "the request body must be a JSON object, sent with "
                             "'Content-Type: application/json'")
    name = ".".join(path)
    if first.get("type") == "missing":
        return APIError(400, f"{name} is required", param=path[0])
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    got = repr(first.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return APIError(400, f"{name}: {message} (got {got})", param=path[0])


def http_error(exc: StarletteHTTPException) -> APIError:
    if exc.status_code == 400 and exc.detail == FASTAPI_BODY_ERROR:
        return APIError(400, "the request body is not valid JSON: it must be a UTF-8 JSON "
                             "object, sent with 'Content-Type: application/json'")
    if exc.status_code == 404:
        return APIError(404, "no such route; see /v1/models, /v1/completions, "
                             "/v1/chat/completions, /health, /metrics", code="route_not_found")
    if exc.status_code == 405:
        return APIError(405, f"method not allowed: {exc.detail}", code="method_not_allowed",
                        headers=dict(exc.headers or {}))
    return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))


def _logged(request: Request, error: APIError) -> APIError:
    """Put the error's message into the request's access-log line."""
    request.scope.setdefault("state", {}).setdefault("log", {})["error"] = error.message
    return error


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        return _logged(request, from_engine_error(exc)).response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        if request.url.path in GENERATION_PATHS:
            request.app.state.server.metrics.fail("invalid_request")
        return _logged(request, validation_error(exc)).response()

    async def on_disconnect(_: Request, __: Exception) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return _logged(request, http_error(exc)).response()

    for kind in (APIError, InvalidRequestError, QueueFullError, EngineDeadError):
        app.add_exception_handler(kind, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ClientDisconnected, on_disconnect)
