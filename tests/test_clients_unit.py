"""The clients' pure parts, with no server: request bodies, SSE events, typed errors, retry
delays, arrivals, datasets, the summary's arithmetic, the compute bar and the PNG report."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import subprocess
import sys

import httpx
import pytest

from clients import (
    AsyncClient,
    BadRequestError,
    Compute,
    RateLimitError,
    ServiceUnavailableError,
    StreamError,
    Usage,
)
from clients.bench.arrivals import gaps, start_times
from clients.bench.datasets import (
    BenchRequest,
    heldout_requests,
    jsonl_requests,
    random_requests,
    sample,
)
from clients.bench.metrics import RequestResult, summarize, timeline
from clients.bench.progress import Progress
from clients.bench.report import write_report
from clients.bench.runner import Load, Target, error_type, send_one
from clients.bench.table import format_summary
from clients.display import bar, format_compute, si
from clients.errors import APIStatusError, parse_retry_after, status_error
from clients.protocol import api_root, chat_body, completion_body, sse_event
from clients.retry import RetryPolicy


def compute(loops: list[float], flops: int = 600, flops_max: int = 1000) -> Compute:
    return Compute(max_loops=3, mean_loops_per_token=sum(loops) / len(loops),
                   loops_per_layer=tuple(loops), memory_gate_per_layer=(0.1, 0.5),
                   flops=flops, flops_max_depth=flops_max, compute_saved=1 - flops / flops_max)


# ---------------------------------------------------------------------- protocol
def test_clients_import_nothing_from_the_server_side():
    code = ("import sys, clients, clients.cli, clients.bench; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'engine', 'server', 'training', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_api_root_accepts_root_and_v1_urls():
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"):
        assert api_root(url) == "http://h:8000"


def test_bodies_drop_none_and_ask_for_usage_when_streaming():
    body = completion_body("hi", "m", {"max_tokens": 4, "top_k": None, "halt_threshold": 0.1},
                           stream=True)
    assert body == {"prompt": "hi", "model": "m", "max_tokens": 4, "halt_threshold": 0.1,
                    "stream": True, "stream_options": {"include_usage": True}}
    chat = chat_body("hello", None, {"extra_body": {"custom": 1}}, stream=False)
    assert chat == {"messages": [{"role": "user", "content": "hello"}], "custom": 1}


def test_unknown_request_field_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="max_token"):
        completion_body("hi", None, {"max_token": 4}, stream=False)


def test_sse_events():
    assert sse_event("") is None and sse_event(": keep-alive") is None
    assert sse_event("data: [DONE]") is None
    assert sse_event('data: {"choices": []}') == {"choices": []}
    with pytest.raises(StreamError, match="deadline") as info:
        sse_event('data: {"error": {"message": "deadline passed", "type": "timeout_error", '
                  '"code": "timeout"}}')
    assert info.value.code == "timeout"


# ---------------------------------------------------------------------- errors and retries
def test_status_errors_are_typed_and_carry_the_server_message():
    body = json.dumps({"error": {"message": "max_loops must be between 1 and 3, got 7",
                                 "type": "invalid_request_error", "param": "max_loops",
                                 "code": None}})
    error = status_error(400, body, {}, "req-1")
    assert isinstance(error, BadRequestError)
    assert (error.message, error.param, error.request_id) == (
        "max_loops must be between 1 and 3, got 7", "max_loops", "req-1")
    limited = status_error(429, "{}", {"retry-after": "2"})
    assert isinstance(limited, RateLimitError) and limited.retry_after == 2.0
    assert isinstance(status_error(503, "draining", {}), ServiceUnavailableError)
    plain = status_error(418, "I'm a teapot", {})
    assert type(plain) is APIStatusError and plain.message == "I'm a teapot"


def test_retry_after_as_http_date():
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_retry_policy_retries_429_and_503_only_and_honours_retry_after():
    policy = RetryPolicy(max_retries=2, initial_backoff=0.5, max_backoff=1.0, jitter=0.0)
    limited = status_error(429, "{}", {"retry-after": "3"})
    assert policy.should_retry(limited, 0) and policy.should_retry(limited, 1)
    assert not policy.should_retry(limited, 2)
    assert not policy.should_retry(status_error(400, "{}", {}), 0)
    assert not policy.should_retry(status_error(500, "{}", {}), 0)
    assert policy.delay(limited, 0) == 3.0
    unavailable = status_error(503, "{}", {})
    assert [policy.delay(unavailable, a) for a in range(3)] == [0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)


# ---------------------------------------------------------------------- bench parts
def test_poisson_and_gamma_arrivals_have_the_asked_rate():
    for burstiness in (1.0, 0.25):
        samples = [g for g, _ in zip(gaps(10.0, burstiness, seed=1), range(20000),
                                     strict=False)]
        assert statistics.fmean(samples) == pytest.approx(0.1, rel=0.05)
        # gamma: cv^2 = 1 / shape, so lower burstiness means burstier arrivals
        cv2 = statistics.pvariance(samples) / statistics.fmean(samples) ** 2
        assert cv2 == pytest.approx(1 / burstiness, rel=0.1)
    starts = [t for t, _ in zip(start_times(float("inf")), range(5), strict=False)]
    assert starts == [0.0] * 5


def test_random_dataset_lengths_and_determinism():
    requests = random_requests(50, input_len=40, output_len=10, range_ratio=0.5, seed=3)
    assert requests == random_requests(50, 40, 10, 0.5, seed=3)
    assert all(20 <= len(r.prompt) <= 60 and 5 <= r.max_tokens <= 15 for r in requests)
    assert len(random_requests(1, 10, 1, chars_per_token=4.0)[0].prompt) == 40


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "12+30=", "answer": "42", "max_tokens": 4},
             {"messages": [{"role": "user", "content": "hi"}]}, {"question": "Q?"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    requests = jsonl_requests(path, default_max_tokens=8)
    assert [r.max_tokens for r in requests] == [4, 8, 8]
    assert requests[0].answer == "42" and requests[2].completion_prompt() == "Q?"
    assert requests[2].chat_messages() == [{"role": "user", "content": "Q?"}]
    with pytest.raises(ValueError, match="use --endpoint chat"):
        requests[1].completion_prompt()
    assert len(sample(requests, 7, seed=1)) == 7
    path.write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: needs a 'prompt'"):
        jsonl_requests(path)
    with pytest.raises(FileNotFoundError, match="--dataset jsonl"):
        heldout_requests(tmp_path / "missing.jsonl")


def result(start: float, ttft: float, e2el: float, tokens: int, chunks: int = 4,
           loops: list[float] | None = None, error: str | None = None) -> RequestResult:
    step = (e2el - ttft) / max(chunks - 1, 1)
    times = [start + ttft + i * step for i in range(chunks)]
    return RequestResult(start=start, success=error is None, error=error, prompt_tokens=5,
                         output_tokens=tokens, ttft=ttft, itl=[step] * (chunks - 1),
                         e2el=e2el, chunk_times=times,
                         compute=compute(loops) if loops else None)


def test_summary_counts_latencies_goodput_and_loops():
    results = [result(0.0, 0.1, 0.4, 4, loops=[1.0, 2.0]),
               result(0.5, 0.3, 1.2, 4, loops=[2.0, 3.0]),
               result(0.6, 0.0, 0.1, 0, chunks=0, error="429 rate_limit_error")]
    s = summarize(results, duration=2.0, slos_ms={"ttft": 200}, percentiles=(90, 99))
    assert (s["num_requests"], s["completed"], s["failed"]) == (3, 2, 1)
    assert s["errors_by_type"] == {"429 rate_limit_error": 1}
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (10, 8)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 4.0
    assert s["request_goodput"] == 0.5  # only the first meets ttft <= 200 ms
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["mean_tpot_ms"] == pytest.approx((100.0 + 300.0) / 2)
    assert s["mean_e2el_ms"] == pytest.approx(800.0) and "p99_itl_ms" in s
    assert s["mean_loops_per_token"] == pytest.approx(2.0)
    assert s["loops_per_layer"] == pytest.approx([1.5, 2.5])  # equal token weights
    assert s["compute_saved"] == pytest.approx(0.4) and s["total_flops"] == 1200
    assert s["max_concurrent_requests"] == 2
    edges, tokens, done = timeline(results, bin_s=1.0)
    assert list(edges) == [0.0, 1.0, 2.0] and tokens.sum() == 8 and done.sum() == 2
    text = format_summary("rate 1/s", s)
    assert "429 rate_limit_error: 1" in text and "Mean loops per token" in text


def test_summary_without_compute_or_successes():
    s = summarize([result(0, 0.1, 0.2, 0, chunks=0, error="connection")], duration=1.0)
    assert s["completed"] == 0 and s["requests_with_compute"] == 0
    assert s["mean_ttft_ms"] == 0.0 and s["request_goodput"] is None
    json.dumps(s, allow_nan=False)


def test_error_types_and_load_validation():
    assert error_type(status_error(503, '{"error": {"message": "x", "type": '
                                        '"service_unavailable"}}', {})) == (
        "503 service_unavailable")
    with pytest.raises(ValueError, match="--num-prompts"):
        Load(num_prompts=None, duration=None)
    with pytest.raises(ValueError, match="without end"):
        Load(num_prompts=None, duration=5.0)  # infinite rate
    assert Load(concurrency=4).label == "concurrency 4"


def test_compute_bar_and_progress_line():
    assert bar([1.0, 2.0, 3.0], 1.0, 3.0) == "▁▅█"
    assert si(1_840_000) == "1.84 M"
    text = format_compute(compute([1.0, 3.0]))
    assert "▁█" in text and "40.0% saved" in text and "memory gate" in text
    progress = Progress("rate 2/s", total=10, duration=None, enabled=False)
    progress.on_send()
    progress.on_done(result(0, 0.1, 0.2, 3))
    assert "1/10" in progress.line() and "err 0" in progress.line()


def test_png_report(tmp_path):
    results = [result(i * 0.1, 0.05, 0.3, 4, loops=[1.2, 2.5]) for i in range(10)]
    s = summarize(results, 1.3)
    path = write_report(tmp_path / "report.png", [("rate 10/s", results, s)], "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_request_prompt_chars():
    assert BenchRequest(messages=({"role": "user", "content": "abc"},)).prompt_chars() == 3


def test_cached_prompt_tokens_lower_a_request_weight_in_the_layer_means():
    usage = Usage.from_json({"prompt_tokens": 10, "completion_tokens": 2,
                             "prompt_tokens_details": {"cached_tokens": 8}})
    assert (usage.cached_tokens, usage.total_tokens, usage.compute) == (8, 12, None)
    # 5 prompt + 4 output - 1 = 8 tokens ran for the first; 8 - 4 cached = 4 for the second
    first = result(0.0, 0.1, 0.4, 4, loops=[1.0, 1.0])
    second = dataclasses.replace(result(0.0, 0.1, 0.4, 4, loops=[3.0, 3.0]), cached_tokens=4)
    layers = summarize([first, second], 1.0)["loops_per_layer"]
    assert layers == pytest.approx([(8 * 1.0 + 4 * 3.0) / 12] * 2)


def test_a_malformed_response_fails_one_request_not_the_run():
    events = ('data: {"choices": [{"index": 0, "text": "a"}]}\n\n'
              'data: {"choices": [], "usage": {"prompt_tokens": "many"}}\n\ndata: [DONE]\n\n')

    def reply(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=events, headers={"content-type": "text/event-stream"})

    async def run() -> RequestResult:
        transport = httpx.MockTransport(reply)
        async with AsyncClient("http://test", transport=transport) as client:
            return await send_one(client, Target(), BenchRequest(prompt="x"), 0.0)

    result = asyncio.run(run())
    assert not result.success and result.error == "invalid_response"
    assert result.ttft is not None and result.text == "a"
