"""/metrics parsed with prometheus_client's parsers: every name of DESIGN section 7 is there,
and the values match the requests sent (token counts, per-request compute, and the engine's
per-layer loop counters against the requests' own loops). OpenMetrics carries exemplars."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from engine import LLMEngine, StepStats, load_tokenizer
from engine.async_engine import AsyncEngine
from server.metrics import ServerMetrics
from tests.helpers import make_model
from tests.server_helpers import (
    MODEL_NAME,
    LiveServer,
    engine_config,
    make_checkpoint,
    stream_json,
)

GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_ratio",
          "layer_memory_gate"]
COUNTERS = ["prompt_tokens", "generation_tokens", "num_preemptions", "prefix_cache_queries",
            "prefix_cache_hits", "request_success", "request_failure",
            "layer_loop_iterations", "layer_tokens"]
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds",
              "e2e_request_latency_seconds", "request_queue_time_seconds",
              "request_prompt_tokens", "request_generation_tokens",
              "request_mean_loops_per_token", "request_compute_saved_ratio", "request_flops",
              "loop_step_active_tokens", "engine_step_seconds"]


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    """A fresh server, a known set of requests, then one scrape of each format."""
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("server-metrics"))
    with LiveServer(checkpoint) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        usages = []
        for i, prompt in enumerate(["alpha", "bravo one", "charlie two three"]):
            response = http.post("/v1/completions", headers={"X-Request-Id": f"metrics-{i}"},
                                 json={"prompt": prompt, "max_tokens": 3 + i,
                                       "ignore_eos": True})
            usages.append(response.json()["usage"])
        chunks = stream_json(http, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "delta"}], "max_tokens": 5,
            "ignore_eos": True, "stream_options": {"include_usage": True}},
            headers={"X-Request-Id": "metrics-3"})
        usages.append(chunks[-1]["usage"])
        assert http.post("/v1/completions", json={"prompt": ""}).status_code == 400
        server.wait_idle()
        text = http.get("/metrics").text
        openmetrics = http.get("/metrics", headers={
            "Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"})
    return usages, text, openmetrics


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    key = (f"loopserve_{name}", tuple(sorted({"model_name": MODEL_NAME, **labels}.items())))
    return found[key]


def test_every_design_metric_is_exposed(traffic):
    _, text, _ = traffic
    names = {name for name, _ in samples(text)}
    expected = ([f"loopserve_{g}" for g in GAUGES] + [f"loopserve_{c}_total" for c in COUNTERS]
                + [f"loopserve_{h}_{part}" for h in HISTOGRAMS
                   for part in ("bucket", "count", "sum")])
    assert not set(expected) - names
    labels = [dict(key[1]) for key in samples(text) if key[0].startswith("loopserve_")]
    assert all(label.get("model_name") == MODEL_NAME for label in labels)


def test_token_and_request_counts_match_the_requests(traffic):
    usages, text, _ = traffic
    found = samples(text)
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)
    assert value(found, "prompt_tokens_total") == prompt
    assert value(found, "generation_tokens_total") == completion
    assert value(found, "request_success_total", finished_reason="length") == len(usages)
    assert value(found, "request_failure_total", reason="invalid_request") == 1
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prompt_tokens"):
        assert value(found, f"{name}_count") == len(usages)
    # one delta per generated token (n = 1): one inter-token interval less than tokens
    assert value(found, "inter_token_latency_seconds_count") == completion - len(usages)
    assert value(found, "request_prompt_tokens_sum") == prompt
    assert value(found, "request_generation_tokens_sum") == completion
    assert value(found, "num_requests_running") == 0
    assert value(found, "num_requests_waiting") == 0
    assert value(found, "kv_cache_usage_ratio") == 0


def test_compute_metrics_match_the_usage(traffic):
    usages, text, _ = traffic
    found = samples(text)
    computes = [u["compute"] for u in usages]
    assert value(found, "request_flops_sum") == pytest.approx(sum(c["flops"] for c in computes))
    assert value(found, "request_mean_loops_per_token_sum") == pytest.approx(
        sum(c["mean_loops_per_token"] for c in computes))
    assert value(found, "request_compute_saved_ratio_sum") == pytest.approx(
        sum(c["compute_saved"] for c in computes))
    assert value(found, "request_mean_loops_per_token_bucket", le="3.0") == len(usages)
    assert value(found, "request_compute_saved_ratio_bucket", le="1.0") == len(usages)


def test_layer_counters_match_the_requests_own_loops(traffic):
    usages, text, _ = traffic
    found = samples(text)
    # tokens that went through the model: every prompt token not served from the prefix
    # cache, and every generated token but the last (never fed back)
    computed = [u["prompt_tokens"] + u["completion_tokens"] - 1 for u in usages]
    hits = value(found, "prefix_cache_hits_total")
    assert hits == 0  # distinct prompts: nothing to share
    iterations = []
    for layer in range(2):
        tokens = value(found, "layer_tokens_total", layer=str(layer))
        assert tokens == sum(computed)
        total = value(found, "layer_loop_iterations_total", layer=str(layer))
        from_requests = sum(u["compute"]["loops_per_layer"][layer] * n
                            for u, n in zip(usages, computed, strict=True))
        assert total == pytest.approx(from_requests)
        assert 1.0 <= total / tokens <= 3.0
        iterations.append(total)
    # every active token of every (layer, loop step) call is one loop iteration
    assert value(found, "loop_step_active_tokens_sum") == sum(iterations)
    # one step-time observation per step that computed tokens: at least one per generated
    # token of the longest request, at most one per computed token
    steps = value(found, "engine_step_seconds_count")
    assert max(u["completion_tokens"] for u in usages) <= steps <= sum(computed)
    assert value(found, "engine_step_seconds_sum") > 0
    for layer in range(2):
        for bank in ("local", "global"):
            assert 0.0 <= value(found, "layer_memory_gate", layer=str(layer), bank=bank) <= 1.0


def test_openmetrics_carries_request_ids_as_exemplars(traffic):
    _, _, response = traffic
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    exemplars = {}
    for family in openmetrics_families(response.text):
        for sample in family.samples:
            if sample.exemplar is not None:
                exemplars.setdefault(family.name, set()).add(
                    sample.exemplar.labels["request_id"])
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_flops", "request_mean_loops_per_token"):
        ids = exemplars[f"loopserve_{name}"]
        assert ids and ids <= {f"metrics-{i}" for i in range(4)}


def test_a_metrics_bug_never_reaches_the_engine_thread(caplog):
    model = make_model()
    engine = AsyncEngine(LLMEngine(model, load_tokenizer(None, model.config), engine_config()))
    metrics = ServerMetrics(engine, MODEL_NAME)

    def stats(preempted: int) -> StepStats:
        return StepStats(num_running=0, num_waiting=0, kv_cache_usage=0.0,
                         num_preempted=preempted, num_prompt_tokens=0, num_generation_tokens=0,
                         prefix_queries=0, prefix_hits=0, active_per_call=[],
                         layer_iterations=[1.0], layer_tokens=1, layer_gates=[])

    with caplog.at_level("ERROR", logger="loopserve.server"):
        metrics.on_step(stats(-1))  # a negative increment: logged, not raised
    assert any("could not record" in r.getMessage() for r in caplog.records)
    metrics.on_step(stats(2))  # and the next step is recorded as usual
    assert metrics.preemptions._value.get() == 2
