"""Typed errors the engine raises; the server maps them to HTTP statuses.

The request and configuration errors live with the model (`model.errors`) and are
re-exported here.
"""

from model.errors import CheckpointError, ConfigError, InvalidRequestError, LoopServeError

__all__ = ["CheckpointError", "ConfigError", "EngineDeadError", "EngineDrainingError",
           "InvalidRequestError", "LoopServeError", "QueueFullError"]


class EngineDeadError(LoopServeError, RuntimeError):
    """The engine loop stopped; no request can be served (maps to HTTP 503)."""


class EngineDrainingError(EngineDeadError):
    """The server is draining (SIGTERM): new requests are refused (HTTP 503)."""


class QueueFullError(LoopServeError, RuntimeError):
    """The waiting queue is at its bound (maps to HTTP 429)."""
