"""`loopserve serve`: flags (each also an environment variable, for containers) -> settings
and engine config -> the app on uvicorn, with SIGTERM draining in-flight requests.

    loopserve serve --port 8000 --api-key secret        # or LOOPSERVE_PORT=8000 ...

The first SIGTERM or SIGINT drains (new requests get 503, /health 503, requests in flight
run for up to --shutdown-timeout seconds), then the server exits 0; a second one stops now.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import uvicorn

from engine.engine_config import ATTENTION_BACKENDS, MODES, EngineConfig
from engine.errors import CheckpointError, ConfigError, EngineDeadError
from engine.gc_freeze import freeze_startup_heap
from server.app import build_engine, create_app
from server.settings import ServerSettings

ENV_PREFIX = "LOOPSERVE_"
TRUE = ("1", "true", "yes", "on")
GRACE_SECONDS = 5.0  # after the drain: for responses still being written


def _csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _add(parser: argparse.ArgumentParser, flag: str, help_: str, default: Any = None,
         type_: Callable[[str], Any] | None = str, **kwargs: Any) -> None:
    """A flag whose default comes from LOOPSERVE_<FLAG> when that is set."""
    env = _env_name(flag)
    if type_ is None:  # a switch
        parser.add_argument(flag, action="store_true",
                            default=os.environ.get(env, "").lower() in TRUE,
                            help=f"{help_} (env {env}=1)")
        return
    default = os.environ.get(env, default)  # argparse applies type_ to a string default
    parser.add_argument(flag, type=type_, default=default, help=f"{help_} (env {env})",
                        **kwargs)


def _server_flags(p: argparse.ArgumentParser) -> None:
    _add(p, "--model", "checkpoint directory (default: the bundled model)")
    _add(p, "--served-model-name", "name clients pass as 'model' (default: the directory name)")
    _add(p, "--host", "interface to listen on", "0.0.0.0")
    _add(p, "--port", "port to listen on", 8000, int)
    _add(p, "--api-key", "comma-separated API keys; clients send 'Authorization: Bearer KEY'",
         "", _csv)
    _add(p, "--max-queue", "waiting requests before new ones get 429", 256, int)
    _add(p, "--request-timeout", "seconds a request may take before it is aborted (0: none)",
         600.0, float)
    _add(p, "--shutdown-timeout", "seconds in-flight requests may run after SIGTERM", 30.0,
         float)
    _add(p, "--stall-timeout", "seconds with requests in the engine and no token computed "
         "before /health fails", 60.0, float)
    _add(p, "--engine-thread", "run the engine loop on a thread of the server process "
         "(default: an engine-core process of its own)", type_=None)
    _add(p, "--core-timeout", "seconds the engine-core process may send nothing (its "
         "heartbeat thread sends every 0.1 s, even during a long step) before it is declared "
         "dead and killed", 2.0, float)
    _add(p, "--step-timeout", "seconds one engine-core step (loop iteration) may run before "
         "it is declared stuck and the core killed (engine-core process only)", 60.0, float)
    _add(p, "--max-body-bytes", "largest request body accepted (413 above)", 1 << 20, int)
    _add(p, "--max-prompts", "most prompts in one /v1/completions request", 64, int)
    _add(p, "--allowed-origins", "comma-separated CORS origins ('*' for any; default: no CORS)",
         "", _csv)
    _add(p, "--allowed-methods", "comma-separated CORS methods", "*", _csv)
    _add(p, "--allowed-headers", "comma-separated CORS headers", "*", _csv)
    _add(p, "--allow-credentials", "CORS: allow credentials", type_=None)
    _add(p, "--no-access-log", "do not write a JSON line per request", type_=None)
    _add(p, "--log-level", "debug, info, warning or error", "info",
         choices=["debug", "info", "warning", "error"])


def _engine_flags(p: argparse.ArgumentParser) -> None:
    _add(p, "--device", "cpu, cuda, cuda:N (default: cuda if available)")
    _add(p, "--dtype", "auto, fp32, bf16 or fp16", "auto")
    _add(p, "--block-size", "token positions per KV block", 16, int)
    _add(p, "--num-kv-blocks", "KV blocks in the pool (default: from --kv-cache-memory-mb)",
         None, int)
    _add(p, "--kv-cache-memory-mb", "memory of the KV pool (default: 256 on CPU; on CUDA "
         "from --gpu-memory-utilization)", None, float)
    _add(p, "--gpu-memory-utilization", "share of the GPU's memory for weights and KV pool",
         0.9, float)
    _add(p, "--loop-form", "form of each (layer, loop step): auto (measured cost model), "
         "masked (fixed shape, no host sync) or compacted", "auto")
    _add(p, "--scheduling-policy", "fcfs (arrival order) or priority (the request's "
         "'priority', lower first, as vLLM)", "fcfs")
    _add(p, "--static-decode", "fixed-shape decode buckets: auto (CUDA graphs on CUDA), on "
         "(buckets on any device, eager without CUDA) or off (every step eager)", "auto")
    _add(p, "--compile-chains", "fuse the masked loop step's elementwise chains with "
         "torch.compile (fewer kernels; compiles at start-up)", type_=None)
    _add(p, "--attention-backend", "decode attention: gather (rows' blocks copied, then "
         "SDPA), flex (FlexAttention over the KV pool in place; compiles at start-up) or "
         "triton (a paged Triton kernel over the pool in place; CUDA)",
         "gather", choices=list(ATTENTION_BACKENDS))
    _add(p, "--max-num-seqs", "most requests in the running batch", 64, int)
    _add(p, "--max-num-batched-tokens", "token budget of one engine step", 1024, int)
    _add(p, "--max-model-len", "context length (default: the model's max_position)", None, int)
    _add(p, "--mode", "adaptive (halting) or max_depth (every token runs N loops)", "adaptive",
         choices=list(MODES))
    _add(p, "--no-prefix-caching", "disable the prefix cache", type_=None)
    _add(p, "--no-chunked-prefill", "schedule whole prompts only", type_=None)
    _add(p, "--seed", "the engine's sampling seed", 0, int)
    _add(p, "--num-threads", "CPU threads for torch (default: torch's choice)", None, int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopserve serve",
                                     description="Serve a looped model over an "
                                                 "OpenAI-compatible HTTP API.")
    _server_flags(parser.add_argument_group("server"))
    _engine_flags(parser.add_argument_group("engine"))
    return parser


def settings_from(args: argparse.Namespace) -> tuple[ServerSettings, EngineConfig]:
    settings = ServerSettings(
        model=args.model, served_model_name=args.served_model_name, host=args.host,
        port=args.port, api_keys=tuple(args.api_key), max_queue=args.max_queue,
        request_timeout=args.request_timeout, shutdown_timeout=args.shutdown_timeout,
        stall_timeout=args.stall_timeout, engine_thread=args.engine_thread,
        core_timeout=args.core_timeout, step_timeout=args.step_timeout,
        max_body_bytes=args.max_body_bytes, max_prompts=args.max_prompts,
        allowed_origins=tuple(args.allowed_origins),
        allowed_methods=tuple(args.allowed_methods), allowed_headers=tuple(args.allowed_headers),
        allow_credentials=args.allow_credentials, access_log=not args.no_access_log,
        log_level=args.log_level)
    config = EngineConfig(
        device=args.device, dtype=args.dtype, block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks, kv_cache_memory_mb=args.kv_cache_memory_mb,
        gpu_memory_utilization=args.gpu_memory_utilization, loop_form=args.loop_form,
        static_decode=args.static_decode, compile_chains=args.compile_chains,
        attention_backend=args.attention_backend,
        scheduling_policy=args.scheduling_policy,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_chunked_prefill=not args.no_chunked_prefill,
        enable_prefix_caching=not args.no_prefix_caching, mode=args.mode, seed=args.seed,
        num_threads=args.num_threads)
    return settings, config


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains before the server stops."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Future | None = None

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        logging.getLogger("loopserve.server").info("%s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        finally:
            self.should_exit = True


def configure_logging(level: str) -> None:
    """Plain lines for the server's own logs; the access log is one JSON object per line."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    access = logging.getLogger("loopserve.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of `loopserve serve` (argv[0] is "serve")."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        argv = argv[1:]
    try:
        settings, config = settings_from(build_parser().parse_args(argv))
        engine, name = build_engine(settings, config)
    except (ConfigError, CheckpointError, EngineDeadError) as exc:
        print(f"loopserve serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    app = create_app(engine, settings, name)
    freeze_startup_heap()  # no 160 ms full-heap collections with the event loop stopped
    uv_config = uvicorn.Config(app, host=settings.host, port=settings.port,
                               log_level=settings.log_level, access_log=False,
                               timeout_graceful_shutdown=GRACE_SECONDS)
    DrainingServer(uv_config, app.state.server.drain).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
