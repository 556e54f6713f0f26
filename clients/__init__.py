"""loopserve clients: they speak HTTP only and import nothing from engine/ or server/.

`Client` / `AsyncClient` talk to any OpenAI-compatible server and read loopserve's
per-request compute from `usage.compute`; `clients.cli` is `loopserve complete|chat`;
`clients.bench` is `loopserve bench`, the load generator.
"""

from clients.async_client import AsyncClient, AsyncStream
from clients.client import Client, Stream
from clients.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    LoopserveError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
    StreamError,
)
from clients.retry import RetryPolicy
from clients.types import Choice, Chunk, Completion, Compute, Model, Usage

__all__ = [
    "APIConnectionError", "APIError", "APIStatusError", "APITimeoutError", "AsyncClient",
    "AsyncStream", "AuthenticationError", "BadRequestError", "Choice", "Chunk", "Client",
    "Completion", "Compute", "InternalServerError", "LoopserveError", "Model",
    "NotFoundError", "PermissionDeniedError", "RateLimitError", "RequestTooLargeError",
    "RetryPolicy", "ServiceUnavailableError", "Stream", "StreamError", "Usage",
]
