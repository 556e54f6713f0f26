"""`ServerSettings`: how the HTTP server behaves (the engine's own options are `EngineConfig`).

Frozen and validated when built, like every config in loopserve; `server.cli` fills it from
flags and environment variables, tests build it directly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from engine.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Server options. Times are seconds; 0 disables `request_timeout`."""

    model: str | None = None  # checkpoint directory; None: the bundled model
    served_model_name: str | None = None  # None: the checkpoint directory's name
    host: str = "0.0.0.0"
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    max_queue: int = 256  # waiting requests before 429
    request_timeout: float = 600.0  # deadline of one request, from arrival to last token
    shutdown_timeout: float = 30.0  # SIGTERM: how long in-flight requests may still run
    stall_timeout: float = 60.0  # /health fails when requests wait or run and no token comes
    engine_thread: bool = False  # True: the engine loop on a thread of this process
    core_timeout: float = 2.0  # an engine-core process silent this long is declared dead
    step_timeout: float = 60.0  # one engine-core loop iteration this long: declared stuck
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_prompts: int = 64  # prompts in one /v1/completions request
    allowed_origins: tuple[str, ...] = ()  # CORS; empty: no CORS headers
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    access_log: bool = True  # one JSON line per request on the loopserve.access logger
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be between 1 and 65535, got {self.port}")
        for name in ("max_queue", "max_body_bytes", "max_prompts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout", "shutdown_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")
        for name in ("stall_timeout", "core_timeout", "step_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if any(not key for key in self.api_keys):
            raise ConfigError("api keys must not be empty strings")

    def model_name(self, model_dir: Path) -> str:
        """The name clients pass as `model`."""
        return self.served_model_name or model_dir.name
