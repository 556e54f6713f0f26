"""Typed errors of the model and of request validation; the server maps them to HTTP."""


class LoopServeError(Exception):
    """Base class of every error loopserve raises on purpose."""


class ConfigError(LoopServeError, ValueError):
    """A model or engine configuration value is out of range or inconsistent."""


class CheckpointError(LoopServeError, ValueError):
    """A checkpoint on disk does not match its config (names, shapes, files)."""


class InvalidRequestError(LoopServeError, ValueError):
    """A request (prompt or sampling parameters) is invalid; maps to HTTP 400.

    ``param`` names the offending field and ``code`` a machine-readable reason, as in
    OpenAI's error object.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None
                 ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
