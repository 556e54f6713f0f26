"""`loopserve bench` against a real loopserve server: the JSON counts match the requests sent,
and the loop statistics read from the responses agree with what the server's /metrics
counted over the same run (parsed with prometheus_client's parser)."""

from __future__ import annotations

import json
from collections import defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import loopserve_cli
from clients.bench import main as bench_main
from tests.server_helpers import LiveServer, make_checkpoint

NUM_PROMPTS, OUTPUT_LEN = 12, 5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveServer(make_checkpoint(tmp_path_factory.mktemp("clients-bench"))) as live:
        yield live


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """Sample name -> {sorted label items (without model_name) -> value}."""
    samples: dict[str, dict[tuple, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            samples[s.name][labels] = s.value
    return samples


def delta(before: dict, after: dict, name: str, labels: tuple = ()) -> float:
    return after[name].get(labels, 0.0) - before[name].get(labels, 0.0)


def total_delta(before: dict, after: dict, name: str) -> float:
    return sum(after[name].values()) - sum(before[name].values())


def run_bench(args: list[str], tmp_path) -> dict:
    path = tmp_path / "result.json"
    assert bench_main(["bench", *args, "--result-file", str(path), "--no-progress"]) == 0
    return json.loads(path.read_text())


def test_bench_counts_and_loop_stats_agree_with_the_server_metrics(server, tmp_path, capsys):
    before = scrape(server.url)
    result = run_bench(["--url", server.url, "--num-prompts", str(NUM_PROMPTS),
                        "--request-rate", "50", "--burstiness", "0.5", "--random-input-len",
                        "12", "--random-output-len", str(OUTPUT_LEN), "--ignore-eos",
                        "--goodput", "e2el:60000", "--plot", str(tmp_path / "report.png")],
                       tmp_path)
    server.wait_idle()
    after = scrape(server.url)
    assert "Serving Benchmark Result" in capsys.readouterr().out
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"

    assert (result["completed"], result["failed"], result["num_requests"]) == (
        NUM_PROMPTS, 0, NUM_PROMPTS)
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert result["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    for key in ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
                "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms", "p90_e2el_ms"):
        assert result[key] > 0, key
    # the server counted the same requests and tokens
    assert total_delta(before, after, "loopserve_request_success_total") == NUM_PROMPTS
    assert delta(before, after, "loopserve_generation_tokens_total") == (
        result["total_output_tokens"])
    assert delta(before, after, "loopserve_prompt_tokens_total") == result["total_input_tokens"]
    # per-request loop figures: the server's histograms hold one observation per request
    count = delta(before, after, "loopserve_request_mean_loops_per_token_count")
    assert count == result["requests_with_compute"] == NUM_PROMPTS
    assert delta(before, after, "loopserve_request_mean_loops_per_token_sum") / count == (
        pytest.approx(result["mean_loops_per_token"], rel=1e-9))
    assert delta(before, after, "loopserve_request_compute_saved_ratio_sum") / count == (
        pytest.approx(result["mean_compute_saved"], rel=1e-9))
    assert delta(before, after, "loopserve_request_flops_sum") == result["total_flops"]
    # per-layer loops: the layer counters' ratio (no prefix-cache hit: every prompt token ran)
    assert delta(before, after, "loopserve_prefix_cache_hits_total") == 0
    for layer, loops in enumerate(result["loops_per_layer"]):
        labels = (("layer", str(layer)),)
        iterations = delta(before, after, "loopserve_layer_loop_iterations_total", labels)
        tokens = delta(before, after, "loopserve_layer_tokens_total", labels)
        assert iterations / tokens == pytest.approx(loops, rel=1e-9)


def test_bench_sweep_closed_loop_chat_jsonl_and_errors(server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"question": q, "answer": "?"})
                                 for q in ("Hi", "What is 2+2?", "Name a river.")))
    sweep = run_bench(["--url", server.url, "--endpoint", "chat", "--dataset", "jsonl",
                       "--dataset-path", str(prompts), "--max-tokens", "3", "--concurrency",
                       "1,3", "--num-prompts", "6", "--warmup", "2", "--save-detailed"],
                      tmp_path)
    assert [run["concurrency"] for run in sweep["runs"]] == [1, 3]
    for run in sweep["runs"]:
        assert run["completed"] == 6 and run["backend"] == "openai-chat"
        assert run["max_concurrent_requests"] <= run["concurrency"]
        assert "exact_match" in run and len(run["ttfts"]) == 6
    bad = run_bench(["--url", f"{server.url}/v1", "--num-prompts", "3", "--max-loops", "99",
                     "--random-input-len", "4", "--random-output-len", "2"], tmp_path)
    assert bad["failed"] == 3 and bad["errors_by_type"] == {"400 invalid_request_error": 3}


def test_bench_duration_limit_through_the_loopserve_command(server, tmp_path):
    path = tmp_path / "duration.json"
    assert loopserve_cli.main(["bench", "--url", server.url, "--duration", "0.3",
                               "--request-rate", "20", "--random-input-len", "4",
                               "--random-output-len", "2", "--result-file", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["num_prompts"] is None and result["duration_limit"] == 0.3
    assert 1 <= result["completed"] == result["num_requests"] <= 20


def test_bench_reports_bad_options(server, capsys):
    assert bench_main(["bench", "--url", server.url, "--dataset", "jsonl"]) == 2
    assert "--dataset-path" in capsys.readouterr().err
