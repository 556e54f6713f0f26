"""`ServerState`: what every route needs (engine, metrics, settings, served name), kept on
`app.state.server`, and the drain that SIGTERM starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator

from starlette.requests import Request

from engine.engine_client import EngineClient
from engine.errors import InvalidRequestError
from engine.input_processor import InputProcessor, PreparedRequest
from server.errors import APIError
from server.generation import Generation, RequestContext
from server.metrics import ServerMetrics
from server.settings import ServerSettings

logger = logging.getLogger("loopserve.server")


@dataclasses.dataclass
class ServerState:
    engine: EngineClient
    metrics: ServerMetrics
    settings: ServerSettings
    model_name: str
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def processor(self) -> InputProcessor:
        """The front door: tokenizer, model config, context length (immutable)."""
        return self.engine.processor

    def generation(self, request: Request, prepared: list[PreparedRequest]) -> Generation:
        ctx = RequestContext.of(request, self.settings.request_timeout)
        return Generation(self.engine, self.metrics, ctx, prepared)

    @contextlib.contextmanager
    def counting_invalid(self) -> Iterator[None]:
        """Count a request rejected before it reached the engine as a failure."""
        try:
            yield
        except (APIError, InvalidRequestError):
            self.metrics.fail("invalid_request")
            raise

    async def drain(self) -> None:
        """Refuse new requests (503, /health 503), let those in flight finish for up to
        `shutdown_timeout` seconds, then abort the rest."""
        if not self.engine.accepting:
            return
        timeout = self.settings.shutdown_timeout
        logger.info("draining: %d requests in flight, up to %gs", self.engine.num_in_flight,
                    timeout)
        aborted = await self.engine.drain(timeout)
        logger.info("drained (%d requests aborted)", aborted)


def server_state(request: Request) -> ServerState:
    return request.app.state.server
