"""Live: a real Prometheus (Debian's package) scraping a real `loopserve serve`.

The server starts the way the image starts it (`loopserve serve` configured by the
Dockerfile's LOOPSERVE_* variables, model, host and port pointed here); Prometheus runs
deploy/prometheus/prometheus.yml and the rules file, retargeted at it and scraping every
second, with exemplar storage on. Requests go in over HTTP; each one's loop count and TTFT
come back out of Prometheus' HTTP API: the histograms' exemplars carry the request id, and
PromQL sums, the recording rules and every dashboard query are checked against what the
responses reported. Every metric the dashboard, rules and autoscaler name must be one the
live /metrics exports.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.test_deploy_support import (
    DEPLOY,
    REPO,
    RULES,
    dashboard_expressions,
    dashboard_variable_metrics,
    load_dashboard,
    promql_metric_names,
    python_tool,
    rule_expressions,
    tool,
    unknown_metrics,
)

MODEL_NAME = "deploy-live"
PROMPTS = ["The loop", "Memory banks hold", "Halting is learned"]
BUNDLED_MODEL = REPO / "models" / "loopserve-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    """Poll `check` until it returns something truthy; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------- processes
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The bundled checkpoint the image serves; a tiny random one until it is committed."""
    if (BUNDLED_MODEL / "config.json").exists():
        return BUNDLED_MODEL
    from engine import save_model
    from tests.helpers import make_model

    path = tmp_path_factory.mktemp("model") / "tiny"
    save_model(make_model(), path)
    return path


def image_environment(model_dir: Path, port: int) -> dict[str, str]:
    """The Dockerfile's runtime LOOPSERVE_* variables, retargeted at this machine."""
    runtime = (REPO / "Dockerfile").read_text().split("AS runtime")[1]
    env = dict(re.findall(r"(LOOPSERVE_[A-Z_]+)=(\S+)", runtime))
    assert {"LOOPSERVE_MODEL", "LOOPSERVE_HOST", "LOOPSERVE_PORT"} <= env.keys()
    env.update(LOOPSERVE_MODEL=str(model_dir), LOOPSERVE_HOST="127.0.0.1",
               LOOPSERVE_PORT=str(port), LOOPSERVE_DEVICE="cpu",
               LOOPSERVE_SERVED_MODEL_NAME=MODEL_NAME, LOOPSERVE_SHUTDOWN_TIMEOUT="5")
    return env


def serve_command() -> list[str]:
    """`loopserve serve`, the image's entrypoint; the module when not pip-installed."""
    script = Path(sys.executable).parent / "loopserve"
    return [str(script), "serve"] if script.exists() else [sys.executable, "-m",
                                                           "loopserve_cli", "serve"]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPSERVE_")}
    env.update(image_environment(model_dir, port))
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(serve_command(), cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or get_ok(f"{url}/health"), 120,
                   "loopserve /health")
        assert proc.poll() is None, f"loopserve exited: {log.read_text()[-3000:]}"
        yield {"url": url, "port": port, "proc": proc}
    finally:
        stop(proc)


def prometheus_config(target_port: int) -> dict:
    """deploy/prometheus/prometheus.yml, scraping every second at the local server."""
    yaml = python_tool("yaml")
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    job = config["scrape_configs"][0]
    assert job["job_name"] == "loopserve"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{target_port}"]}]
    return config


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    binary = tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(json.dumps(prometheus_config(server["port"])))
    port = free_port()
    cmd = [binary, f"--config.file={work / 'prometheus.yml'}",
           f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
           "--enable-feature=exemplar-storage", "--log.level=warn"]
    with open(work / "prometheus.log", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: proc.poll() is not None or get_ok(f"{url}/-/ready"), 60,
                   "Prometheus /-/ready")
        assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
        wait_until(lambda: instant(url, 'up{job="loopserve"} == 1'), 30,
                   "the first successful scrape of loopserve")
        yield url
    finally:
        stop(proc)


# ---------------------------------------------------------------------------- Prometheus API
def api(url: str, path: str, **params) -> dict:
    response = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=10)
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]


def instant(url: str, query: str) -> list[dict]:
    return api(url, "query", query=query)["result"]


def scalar(url: str, query: str) -> float | None:
    result = instant(url, query)
    return float(result[0]["value"][1]) if result else None


def exemplars(url: str, selector: str) -> dict[str, float]:
    """request_id -> exemplar value, for every exemplar of the selected series."""
    now = time.time()
    data = api(url, "query_exemplars", query=selector, start=now - 600, end=now + 60)
    return {e["labels"]["request_id"]: float(e["value"])
            for series in data for e in series["exemplars"] if "request_id" in e["labels"]}


def wait_for_value(url: str, query: str, expected: float, what: str) -> float:
    def close():
        value = scalar(url, query)
        return value is not None and math.isclose(value, expected, rel_tol=1e-9)

    wait_until(close, 20, f"{what}: {query} == {expected} (last {scalar(url, query)})")
    return expected


# ---------------------------------------------------------------------------- traffic
def complete(server_url: str, index: int, prompt: str) -> dict:
    """One streamed completion; returns its id, client-side TTFT and reported compute."""
    request_id = f"deploy-live-{index}-{time.time_ns()}"
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start, first, usage = time.monotonic(), None, None
    with httpx.stream("POST", f"{server_url}/v1/completions", json=body, timeout=60,
                      headers={"X-Request-Id": request_id}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["x-request-id"] == request_id
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if first is None and chunk.get("choices"):  # text may lag a token (UTF-8)
                first = time.monotonic() - start
            usage = chunk.get("usage") or usage
    assert usage is not None and first is not None
    return {"id": request_id, "ttft": first, "e2e": time.monotonic() - start,
            "compute": usage["compute"]}


@pytest.fixture(scope="module")
def traffic(server, prometheus) -> list[dict]:
    """Requests one at a time, each waited for in Prometheus' exemplar store: a bucket
    exposes only its latest exemplar, so a scrape must fall between two requests."""
    sent = []
    for i, prompt in enumerate(PROMPTS):
        request = complete(server["url"], i, prompt)
        wait_until(lambda r=request: r["id"] in exemplars(
            prometheus, "loopserve_request_mean_loops_per_token_bucket"), 20,
            f"the exemplar of request {request['id']}")
        sent.append(request)
    return sent


# ---------------------------------------------------------------------------- tests
def test_per_request_loops_and_ttft_come_back_through_prometheus(prometheus, traffic):
    loops = exemplars(prometheus, 'loopserve_request_mean_loops_per_token_bucket'
                                  f'{{model_name="{MODEL_NAME}"}}')
    ttfts = exemplars(prometheus, 'loopserve_time_to_first_token_seconds_bucket'
                                  f'{{model_name="{MODEL_NAME}"}}')
    for request in traffic:
        reported = request["compute"]["mean_loops_per_token"]
        assert loops[request["id"]] == pytest.approx(reported, rel=1e-9)
        assert 1 <= loops[request["id"]] <= request["compute"]["max_loops"]
        # the server's TTFT starts at arrival, the client's before sending: never larger
        assert 0 < ttfts[request["id"]] <= request["ttft"]


def test_promql_sums_match_the_responses(prometheus, traffic):
    selector = f'{{model_name="{MODEL_NAME}"}}'
    n = len(traffic)
    wait_for_value(prometheus, f"sum(loopserve_request_success_total{selector})", n,
                   "finished requests")
    assert scalar(prometheus, f"loopserve_request_mean_loops_per_token_count{selector}") == n
    total_loops = sum(r["compute"]["mean_loops_per_token"] for r in traffic)
    assert scalar(prometheus, f"loopserve_request_mean_loops_per_token_sum{selector}") == \
        pytest.approx(total_loops, rel=1e-9)
    assert scalar(prometheus, f"loopserve_time_to_first_token_seconds_count{selector}") == n
    ttft_sum = scalar(prometheus, f"loopserve_time_to_first_token_seconds_sum{selector}")
    assert 0 < ttft_sum <= sum(r["ttft"] for r in traffic)


def test_per_layer_loops_through_promql(prometheus, traffic, model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    per_layer = instant(prometheus, "sum by (layer) (loopserve_layer_loop_iterations_total) "
                                    "/ sum by (layer) (loopserve_layer_tokens_total)")
    assert sorted(int(s["metric"]["layer"]) for s in per_layer) == \
        list(range(config["n_layers"]))
    for series in per_layer:
        assert 1 <= float(series["value"][1]) <= config["max_loops"]


def test_recording_rules_evaluate_on_live_data(prometheus, traffic):
    rules = [r for g in api(prometheus, "rules")["groups"] for r in g["rules"]]
    assert len(rules) == len(rule_expressions())
    assert [r["name"] for r in rules if r["health"] != "ok"] == []
    expected = sum(r["compute"]["mean_loops_per_token"] for r in traffic) / len(traffic)
    # rates of _sum and _count share timestamps, so their ratio is exactly sum / count
    wait_for_value(prometheus, "model_name:loopserve_request_mean_loops_per_token:mean5m"
                               f'{{model_name="{MODEL_NAME}"}}', expected,
                   "the recorded mean loops per token")
    layers = instant(prometheus, "model_name_layer:loopserve_layer_mean_loops:ratio_rate5m")
    assert layers and all(float(s["value"][1]) >= 1 for s in layers)


def exported_names(server_url: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server_url}/metrics", timeout=10).text
    return {sample.name for family in text_string_to_metric_families(text)
            for sample in family.samples}


def autoscaler_metrics() -> set[str]:
    yaml = python_tool("yaml")
    hpa = yaml.safe_load((DEPLOY / "k8s" / "hpa.yaml").read_text())
    adapter = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-values.yaml").read_text())
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    for rule in adapter["rules"]["custom"]:
        names |= promql_metric_names(rule["seriesQuery"])
    return names


def test_dashboard_rules_and_autoscaler_name_only_exported_metrics(server, traffic):
    exported = exported_names(server["url"])
    dashboard = load_dashboard()
    named = dashboard_variable_metrics(dashboard) | autoscaler_metrics()
    for _, expr in dashboard_expressions(dashboard) + rule_expressions():
        named |= promql_metric_names(expr)
    assert named, "no metric names found: the extraction is broken"
    assert unknown_metrics(named, exported) == set()


def test_every_dashboard_panel_shows_data(prometheus, traffic, model_dir):
    """Each query runs on the real Prometheus; each panel has at least one series."""
    config = json.loads((model_dir / "config.json").read_text())
    has_memory = config.get("local_memory_slots", 0) + config.get("global_memory_slots", 0) > 0
    series: dict[str, int] = {}
    for title, expr in dashboard_expressions(load_dashboard()):
        series[title] = series.get(title, 0) + len(instant(prometheus, expr))
    if not has_memory:
        series.pop("Memory-gate activity per layer")
    assert [title for title, count in series.items() if count == 0] == []


def test_image_healthcheck_command_passes_only_on_a_healthy_server(server, prometheus):
    runtime = (REPO / "Dockerfile").read_text().split("AS runtime")[1]
    command = json.loads(re.search(r"^\s+CMD (\[.*\])$", runtime, flags=re.M).group(1))
    assert command[0] == "python3"
    command[0] = sys.executable

    def check(port: int) -> int:
        env = {**os.environ, "LOOPSERVE_PORT": str(port)}
        return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode

    assert check(server["port"]) == 0
    assert check(int(prometheus.rsplit(":", 1)[1])) != 0  # Prometheus has no /health: 404
