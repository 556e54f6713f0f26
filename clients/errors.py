"""Typed errors of the clients: each carries what the server said, so a user can act on it.

    LoopserveError
    ├── APIConnectionError          the server could not be reached
    │   └── APITimeoutError         no answer within the timeout
    └── APIError                    the server answered with an OpenAI error object
        ├── StreamError             ... inside an SSE stream (status unknown)
        └── APIStatusError          ... with an HTTP error status
            ├── BadRequestError          400
            ├── AuthenticationError      401
            ├── PermissionDeniedError    403
            ├── NotFoundError            404
            ├── RequestTooLargeError     413
            ├── RateLimitError           429 (retry_after from Retry-After)
            ├── InternalServerError      5xx
            └── ServiceUnavailableError  503 (retry_after from Retry-After)
"""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any


class LoopserveError(Exception):
    """Every error the clients raise."""


class APIConnectionError(LoopserveError):
    """The request never got an answer: connection refused, reset, DNS, ..."""


class APITimeoutError(APIConnectionError):
    """The server did not answer within the client's timeout."""


class APIError(LoopserveError):
    """An OpenAI error object from the server: {"error": {message, type, param, code}}."""

    def __init__(self, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | int | None = None, body: Any = None,
                 request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.body = body
        self.request_id = request_id


class StreamError(APIError):
    """An error event inside an SSE stream (the HTTP status was already 200)."""


class APIStatusError(APIError):
    """An HTTP error status with the server's message."""

    status_code: int = 0

    def __init__(self, message: str, *, status_code: int, retry_after: float | None = None,
                 **fields: Any) -> None:
        super().__init__(message, **fields)
        self.status_code = status_code
        self.retry_after = retry_after  # seconds, from the Retry-After header

    def __str__(self) -> str:
        return f"{self.status_code} {self.type or 'error'}: {self.message}"


class BadRequestError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError):
    pass


class RequestTooLargeError(APIStatusError):
    pass


class RateLimitError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


class ServiceUnavailableError(InternalServerError):
    pass


STATUS_ERRORS: dict[int, type[APIStatusError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
    404: NotFoundError, 413: RequestTooLargeError, 429: RateLimitError,
    503: ServiceUnavailableError,
}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: either a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def error_fields(body: Any, fallback: str) -> dict[str, Any]:
    """message/type/param/code of an OpenAI error body; any other body becomes the message."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return {"message": str(error.get("message") or fallback), "type": error.get("type"),
                "param": error.get("param"), "code": error.get("code")}
    if isinstance(error, str):  # some servers send {"error": "..."}
        return {"message": error}
    if isinstance(body, dict) and "detail" in body:  # FastAPI's default error shape
        return {"message": str(body["detail"])}
    return {"message": fallback}


def status_error(status: int, text: str, headers: dict[str, str] | None = None,
                 request_id: str | None = None) -> APIStatusError:
    """The typed exception of an HTTP error response."""
    try:
        body: Any = json.loads(text) if text else None
    except ValueError:
        body = text
    reason = text.strip()[:200] if isinstance(body, str) and body.strip() else f"HTTP {status}"
    fields = error_fields(body, reason)
    kind = STATUS_ERRORS.get(status, InternalServerError if status >= 500 else APIStatusError)
    retry_after = parse_retry_after((headers or {}).get("retry-after"))
    return kind(status_code=status, retry_after=retry_after, body=body, request_id=request_id,
                **fields)
