"""The FastAPI app factory: routes, error handlers, middleware, metrics, and the engine's
lifetime (started with the app; drained, then stopped, when the app shuts down).

    engine, name = build_engine(settings, EngineConfig(...))
    app = create_app(engine, settings, name)        # serve with uvicorn (see server.cli)

By default the engine core runs in its own process (`EngineCoreClient`): the event loop
never shares the GIL with a model step, and a crash of the core cannot take the server
with it. `settings.engine_thread` keeps it on a thread of this process (`AsyncEngine`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from engine.async_engine import AsyncEngine
from engine.core_client import EngineCoreClient
from engine.engine_client import EngineClient
from engine.engine_config import EngineConfig
from engine.errors import ConfigError
from engine.llm_engine import LLMEngine
from engine.sampling_params import MAX_N
from model.weights import BUNDLED_MODEL_DIR, CONFIG_FILE
from server import routes_chat, routes_completions, routes_misc
from server.errors import install_error_handlers
from server.metrics import ServerMetrics
from server.middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestContextMiddleware
from server.openapi import RequestLimits, install_openapi
from server.routes_misc import server_version
from server.settings import ServerSettings
from server.state import ServerState


def model_dir(settings: ServerSettings) -> Path:
    """The checkpoint to serve: --model, or the bundled one (which must exist)."""
    path = Path(settings.model) if settings.model else BUNDLED_MODEL_DIR
    if not (path / CONFIG_FILE).is_file():
        hint = ("the bundled model is not there yet: train it (loopserve train) or pass "
                "--model DIR" if settings.model is None else "pass a checkpoint directory")
        raise ConfigError(f"no loopserve checkpoint at {path} ({CONFIG_FILE} is missing); "
                          f"{hint}")
    return path


def build_engine(settings: ServerSettings, config: EngineConfig) -> tuple[EngineClient, str]:
    """Load the checkpoint into an (unstarted) engine; returns it and the served name. With
    an engine-core process, this waits until the core has loaded the model and raises its
    load error (ConfigError, CheckpointError)."""
    path = model_dir(settings)
    if settings.engine_thread:
        llm = LLMEngine.from_pretrained(path, config)
        engine: EngineClient = AsyncEngine(llm, max_queue=settings.max_queue,
                                           stall_timeout=settings.stall_timeout)
    else:
        engine = EngineCoreClient(path, config, max_queue=settings.max_queue,
                                  stall_timeout=settings.stall_timeout,
                                  core_timeout=settings.core_timeout,
                                  step_timeout=settings.step_timeout)
    return engine, settings.model_name(path)


def _middleware(settings: ServerSettings) -> list[Middleware]:
    """Outermost first: request id and log see everything, CORS answers preflights before
    authentication, authentication runs before a body is read."""
    stack = [Middleware(RequestContextMiddleware, access_log=settings.access_log)]
    if settings.allowed_origins:
        stack.append(Middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                                allow_methods=list(settings.allowed_methods),
                                allow_headers=list(settings.allowed_headers),
                                allow_credentials=settings.allow_credentials,
                                expose_headers=["X-Request-Id"]))
    stack.append(Middleware(ApiKeyMiddleware, api_keys=settings.api_keys))
    stack.append(Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes))
    return stack


def create_app(engine: EngineClient, settings: ServerSettings | None = None,
               model_name: str = "loopserve") -> FastAPI:
    """An app serving `engine` as `model_name`; the engine starts with the app."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics(engine, model_name)
    engine.set_stats_callback(metrics.on_step)
    state = ServerState(engine, metrics, settings, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await state.drain()
        engine.shutdown()

    app = FastAPI(title="loopserve", version=server_version(), lifespan=lifespan,
                  middleware=_middleware(settings))
    app.state.server = state
    install_error_handlers(app)
    for module in (routes_completions, routes_chat, routes_misc):
        app.include_router(module.router)
    install_openapi(app, _limits(state, settings))
    return app


def _limits(state: ServerState, settings: ServerSettings) -> RequestLimits:
    processor = state.processor
    return RequestLimits(max_model_len=processor.max_model_len,
                         vocab_size=processor.model_config.vocab_size,
                         max_loops=processor.model_config.max_loops,
                         max_n=min(MAX_N, processor.max_num_seqs),
                         max_prompts=settings.max_prompts, api_keys=bool(settings.api_keys),
                         model_name=state.model_name)
