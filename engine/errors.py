"""Typed errors the engine raises; the server maps them to HTTP statuses."""


class LoopServeError(Exception):
    """Base class of every error loopserve raises on purpose."""


class ConfigError(LoopServeError, ValueError):
    """A model or engine configuration value is out of range or inconsistent."""


class CheckpointError(LoopServeError, ValueError):
    """A checkpoint on disk does not match its config (names, shapes, files)."""


class InvalidRequestError(LoopServeError, ValueError):
    """A request (prompt or sampling parameters) is invalid; maps to HTTP 400.

    ``param`` names the offending field, as in OpenAI's error object.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class EngineDeadError(LoopServeError, RuntimeError):
    """The engine loop stopped; no request can be served (maps to HTTP 503)."""


class QueueFullError(LoopServeError, RuntimeError):
    """The waiting queue is at its bound (maps to HTTP 429)."""
