"""When to retry and how long to wait: 429 and 503 (and connection failures), with
exponential backoff and jitter, or exactly the server's Retry-After when it sends one."""

from __future__ import annotations

import dataclasses
import random

import httpx

from clients.errors import APIStatusError

RETRY_STATUSES = frozenset({429, 503})
# the request never reached the server, so sending it again cannot run it twice
RETRY_TRANSPORT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """`max_retries` further attempts after the first; delays in seconds."""

    max_retries: int = 3
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    jitter: float = 0.25  # a delay is shortened by up to this fraction, at random
    max_retry_after: float = 60.0  # a longer Retry-After is capped to this

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff:
            raise ValueError("backoff must satisfy 0 <= initial_backoff <= max_backoff, got "
                             f"{self.initial_backoff} and {self.max_backoff}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter}")

    def should_retry(self, error: Exception, attempt: int) -> bool:
        """`attempt` counts the retries already made (0 after the first failure)."""
        if attempt >= self.max_retries:
            return False
        if isinstance(error, APIStatusError):
            return error.status_code in RETRY_STATUSES
        return isinstance(error, RETRY_TRANSPORT_ERRORS)

    def delay(self, error: Exception, attempt: int) -> float:
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            return min(float(retry_after), self.max_retry_after)
        backoff = min(self.initial_backoff * 2**attempt, self.max_backoff)
        return backoff * (1.0 - self.jitter * random.random())
