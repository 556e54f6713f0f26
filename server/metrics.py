"""Prometheus metrics of DESIGN section 7, all prefixed `loopserve_` and labelled `model_name`.

Two sources feed them:
- the engine's step statistics (`ServerMetrics.on_step`, the engine's stats callback: on the
  engine thread, or, with an engine-core process, on the API process's event loop as each
  output batch arrives with the statistics of its step): preemptions, prefix-cache lookups,
  the batch size of every (layer, loop step) call, loop iterations and tokens per layer,
  memory-gate activity. The registry lives in the API process either way;
- the event loop, from each request's deltas (`RequestObserver`): tokens, latencies, and the
  request's compute from its final delta; histograms carry the X-Request-Id as exemplar
  (shown when the scraper asks for OpenMetrics).
Gauges of the queue and the KV pool are read live at scrape time, also under vLLM's names
(`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` and
the older `vllm:gpu_cache_usage_perc`, all 0..1 like vLLM's) for routers that read those.
With an engine-core process, `loopserve_engine_core_messages_total` and
`loopserve_engine_core_bytes_total` count what crossed from the core (the IPC cost).
Each app owns its registry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import choose_encoder

from engine.engine_client import EngineClient
from engine.llm_engine import StepStats
from engine.request import RequestOutput

logger = logging.getLogger("loopserve.server")

# vLLM's buckets where vLLM has the metric
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.125, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0)
RATIO_BUCKETS = tuple(i / 20 for i in range(21))
FAILURE_REASONS = ("invalid_request", "queue_full", "timeout", "client_disconnect",
                   "engine_unavailable", "aborted", "internal_error")
BANKS = ("local", "global")
# the gauges routers read by vLLM's names (llm-d's / Gateway API Inference Extension's
# endpoint picker: --total-queued-requests-metric, --total-running-requests-metric and
# --kv-cache-usage-percentage-metric, whose default is one of the two KV names by version)
VLLM_ALIASES = {"vllm:num_requests_waiting": "loopserve_num_requests_waiting",
                "vllm:num_requests_running": "loopserve_num_requests_running",
                "vllm:kv_cache_usage_perc": "loopserve_kv_cache_usage_ratio",
                "vllm:gpu_cache_usage_perc": "loopserve_kv_cache_usage_ratio"}


def one_two_five(limit: float, start: float = 1.0) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's build_1_2_5_buckets)."""
    buckets, scale = [], start
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(buckets)
            buckets.append(float(m * scale))
        scale *= 10


def loop_buckets(max_loops: int) -> tuple[float, ...]:
    """Fine buckets from 1 to N: 0.1 wide for small N, 50 of them for large N."""
    width = 0.1 if max_loops <= 6 else (max_loops - 1) / 50
    count = round((max_loops - 1) / width)
    return tuple(round(1 + i * width, 4) for i in range(count + 1))


class ServerMetrics:
    """The registry and its metrics for one served model."""

    def __init__(self, engine: EngineClient, model_name: str) -> None:
        disable_created_metrics()  # no *_created series (process-wide, as vLLM does)
        self.engine = engine
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        cfg = engine.processor.model_config
        self._make_gauges()
        self._make_counters(cfg.n_layers)
        self._make_histograms(cfg.max_loops, engine.max_model_len,
                              engine.config.max_num_batched_tokens)
        if hasattr(engine, "ipc_counts"):
            self.registry.register(CoreIpcCollector(engine.ipc_counts, model_name))
        self._last_prefix = (0, 0)

    # ------------------------------------------------------------------ construction
    def _labels(self, metric, *values: str):
        return metric.labels(self.model_name, *values)

    def _make_gauges(self) -> None:
        r, m = self.registry, ["model_name"]
        engine = self.engine
        gauges: dict[str, tuple[str, Callable[[], float]]] = {
            "loopserve_num_requests_running": ("Requests in the running batch.",
                                               lambda: engine.num_running),
            "loopserve_num_requests_waiting": ("Requests waiting to be scheduled.",
                                               lambda: engine.num_waiting),
            "loopserve_kv_cache_usage_ratio": ("Fraction of KV blocks owned by requests "
                                               "(1 = full).", engine.kv_cache_usage),
        }
        for alias, name in VLLM_ALIASES.items():
            gauges[alias] = (f"{name}, under vLLM's name (for routers).", gauges[name][1])
        for name, (doc, read) in gauges.items():
            self._labels(Gauge(name, doc, m, registry=r)).set_function(read)
        self.memory_gate = Gauge("loopserve_layer_memory_gate",
                                 "Mean memory-gate activation of the last step, per layer and "
                                 "bank.", m + ["layer", "bank"], registry=r)

    def _make_counters(self, num_layers: int) -> None:
        r, m = self.registry, ["model_name"]
        self.prompt_tokens = self._labels(Counter(
            "loopserve_prompt_tokens", "Prompt tokens of requests that started generating.", m,
            registry=r))
        self.generation_tokens = self._labels(Counter(
            "loopserve_generation_tokens", "Generated tokens.", m, registry=r))
        self.preemptions = self._labels(Counter(
            "loopserve_num_preemptions", "Requests preempted for lack of KV blocks.", m,
            registry=r))
        self.prefix_queries = self._labels(Counter(
            "loopserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", m,
            registry=r))
        self.prefix_hits = self._labels(Counter(
            "loopserve_prefix_cache_hits", "Prompt tokens found in the prefix cache.", m,
            registry=r))
        self.success = Counter("loopserve_request_success", "Requests that finished, by reason.",
                               m + ["finished_reason"], registry=r)
        self.failure = Counter("loopserve_request_failure", "Requests that failed, by reason.",
                               m + ["reason"], registry=r)
        for reason in ("stop", "length"):
            self._labels(self.success, reason)
        for reason in FAILURE_REASONS:
            self._labels(self.failure, reason)
        iterations = Counter("loopserve_layer_loop_iterations",
                             "Loop steps run in each layer, summed over tokens.",
                             m + ["layer"], registry=r)
        tokens = Counter("loopserve_layer_tokens", "Tokens that went through each layer.",
                         m + ["layer"], registry=r)
        self.layer_iterations = [self._labels(iterations, str(i)) for i in range(num_layers)]
        self.layer_tokens = [self._labels(tokens, str(i)) for i in range(num_layers)]

    def _make_histograms(self, max_loops: int, max_model_len: int, max_batched: int) -> None:
        r, m = self.registry, ["model_name"]

        def hist(name: str, doc: str, buckets: tuple[float, ...]):
            return self._labels(Histogram(name, doc, m, buckets=buckets, registry=r))

        self.ttft = hist("loopserve_time_to_first_token_seconds",
                         "From arrival to the first generated token.", TTFT_BUCKETS)
        self.itl = hist("loopserve_inter_token_latency_seconds",
                        "Between two successive deltas of a request.", ITL_BUCKETS)
        self.e2e = hist("loopserve_e2e_request_latency_seconds",
                        "From arrival to the last token.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist("loopserve_request_queue_time_seconds",
                               "From entering the engine to first being scheduled.",
                               REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = hist("loopserve_request_prompt_tokens",
                                          "Prompt tokens per request.",
                                          one_two_five(max_model_len))
        self.request_generation_tokens = hist("loopserve_request_generation_tokens",
                                              "Generated tokens per request (all choices).",
                                              one_two_five(max_model_len * 16))
        self.mean_loops = hist("loopserve_request_mean_loops_per_token",
                               "Mean loop steps per token and layer of each request.",
                               loop_buckets(max_loops))
        self.compute_saved = hist("loopserve_request_compute_saved_ratio",
                                  "1 - flops / flops_max_depth of each request.", RATIO_BUCKETS)
        self.flops = hist("loopserve_request_flops", "FLOPs spent by each request.",
                          one_two_five(1e18, start=1e3))
        self.active_tokens = hist("loopserve_loop_step_active_tokens",
                                  "Tokens in each (layer, loop step) call: shows the regrouping "
                                  "as tokens halt.", one_two_five(max_batched))
        self.step_time = hist("loopserve_engine_step_seconds",
                              "Wall time of each engine step that computed tokens, in the "
                              "process that runs it (the engine core).", STEP_BUCKETS)

    # ------------------------------------------------------------------ engine side
    def on_step(self, stats: StepStats) -> None:
        """The engine's stats callback (runs on the engine thread, whose loop dies with any
        exception raised here: a metrics bug is logged, never raised)."""
        try:
            self._record_step(stats)
        except Exception:  # noqa: BLE001
            logger.exception("could not record the engine step's metrics")

    def _record_step(self, stats: StepStats) -> None:
        self.step_time.observe(stats.step_seconds)
        if stats.num_preempted:
            self.preemptions.inc(stats.num_preempted)
        queries, hits = stats.prefix_queries, stats.prefix_hits
        last_queries, last_hits = self._last_prefix
        if queries > last_queries:
            self.prefix_queries.inc(queries - last_queries)
        if hits > last_hits:
            self.prefix_hits.inc(hits - last_hits)
        self._last_prefix = (queries, hits)
        for _, _, active in stats.active_per_call:
            if active:
                self.active_tokens.observe(active)
        for layer, iterations in enumerate(stats.layer_iterations):
            self.layer_iterations[layer].inc(iterations)
            self.layer_tokens[layer].inc(stats.layer_tokens)
        self._set_gates(stats.layer_gates)

    def _set_gates(self, layer_gates: list[list[float]]) -> None:
        cfg = self.engine.processor.model_config
        present = [slots > 0 for slots in (cfg.local_memory_slots, cfg.global_memory_slots)]
        for layer, gates in enumerate(layer_gates):
            for bank, (name, value) in enumerate(zip(BANKS, gates, strict=False)):
                if present[bank]:
                    self.memory_gate.labels(self.model_name, str(layer), name).set(value)

    # ------------------------------------------------------------------ request side
    def observer(self, exemplar_id: str, arrival: float) -> RequestObserver:
        return RequestObserver(self, exemplar_id, arrival)

    def fail(self, reason: str) -> None:
        self._labels(self.failure, reason).inc()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format the scraper asked for (OpenMetrics carries exemplars)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class RequestObserver:
    """Per-request latency, token and compute metrics, fed with each delta on the event loop.

    Times are `time.monotonic()` seconds, the engine's clock (system-wide on Linux and
    macOS: a final-only request's held delta times, taken in the engine-core process, are
    on the same clock as this process's arrival time).
    """

    __slots__ = ("metrics", "exemplar", "arrival", "last", "done", "finished_choices")

    def __init__(self, metrics: ServerMetrics, exemplar_id: str, arrival: float) -> None:
        self.metrics = metrics
        self.exemplar = {"request_id": exemplar_id}
        self.arrival = arrival
        self.last: float | None = None  # when the previous delta arrived
        self.done = False
        self.finished_choices: dict[int, tuple[str, int]] = {}  # index -> (reason, tokens)

    def on_delta(self, delta: RequestOutput) -> None:
        now = time.monotonic()
        m = self.metrics
        if self.last is None:
            m.prompt_tokens.inc(len(delta.prompt_token_ids))
        # a final-only request's output also says when its held-back deltas were ready, and
        # a merged delta when the deltas merged into it were (engine/output_merge.py)
        held = (delta.metrics or {}).get("held_delta_times", ()) if delta.finished else ()
        for emitted in (*held, *delta.merged_ready_times, now):
            self._on_emitted(emitted)
        new_tokens = 0
        for choice in delta.outputs:
            new_tokens += len(choice.token_ids)
            if choice.finish_reason is not None:
                self.finished_choices[choice.index] = (choice.finish_reason, choice.num_tokens)
        if new_tokens:
            m.generation_tokens.inc(new_tokens)
        if delta.finished:
            self._on_finish(delta, now)

    def _on_emitted(self, when: float) -> None:
        """Time to first token, then inter-token latency, of one (possibly held) delta."""
        if self.last is None:
            self.metrics.ttft.observe(when - self.arrival, self.exemplar)
        else:
            self.metrics.itl.observe(when - self.last, self.exemplar)
        self.last = when

    def _on_finish(self, final: RequestOutput, now: float) -> None:
        reasons = [reason for reason, _ in self.finished_choices.values()]
        if not reasons or any(r not in ("stop", "length") for r in reasons):
            return  # an abort: reported by `fail`
        reason = self.finished_choices.get(0, (reasons[0], 0))[0]
        self.done = True
        m, ex = self.metrics, self.exemplar
        m.e2e.observe(now - self.arrival, ex)
        times = final.metrics or {}
        if times.get("first_scheduled_time") is not None:
            m.queue_time.observe(max(0.0, times["first_scheduled_time"] - times["arrival_time"]),
                                 ex)
        m.request_prompt_tokens.observe(len(final.prompt_token_ids), ex)
        m.request_generation_tokens.observe(
            sum(tokens for _, tokens in self.finished_choices.values()), ex)
        if final.compute:
            m.mean_loops.observe(final.compute.mean_loops_per_token, ex)
            m.compute_saved.observe(final.compute.compute_saved, ex)
            m.flops.observe(final.compute.flops, ex)
        m._labels(m.success, reason).inc()

    def fail(self, reason: str) -> None:
        """Count this request as failed, once, unless it already finished."""
        if not self.done:
            self.done = True
            self.metrics.fail(reason)


class CoreIpcCollector:
    """Messages and bytes received from the engine-core process, read at scrape time."""

    def __init__(self, read: Callable[[], tuple[int, int]], model_name: str) -> None:
        self._read = read
        self._model_name = model_name

    def collect(self):
        messages, size = self._read()
        for name, doc, value in (
                ("loopserve_engine_core_messages", "Messages received from the engine core.",
                 messages),
                ("loopserve_engine_core_bytes", "Bytes received from the engine core.", size)):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self._model_name], value)
            yield family
