"""The server through the official `openai` SDK (sync and async) and httpx: completions and
chat, streaming and not, n, logprobs, echo, several prompts, stop strings, the compute knobs,
and the small routes. Greedy outputs are checked against the offline engine."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from server.schemas import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse
from tests.server_helpers import MODEL_NAME, LiveServer, make_checkpoint, stream_json

GREEDY = {"temperature": 0.0}
COMPUTE_KEYS = {"max_loops", "mean_loops_per_token", "loops_per_layer", "memory_gate_per_layer",
                "flops", "flops_max_depth", "compute_saved"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("server-openai"))


@pytest.fixture(scope="module")
def server(checkpoint):
    with LiveServer(checkpoint) as live:
        yield live


@pytest.fixture(scope="module")
def offline(checkpoint):
    return LLM(str(checkpoint), num_kv_blocks=256, block_size=4, device="cpu")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def check_compute(compute: dict, n_layers: int = 2) -> None:
    assert set(compute) == COMPUTE_KEYS
    assert len(compute["loops_per_layer"]) == n_layers
    assert 1.0 <= compute["mean_loops_per_token"] <= compute["max_loops"]
    assert compute["flops"] <= compute["flops_max_depth"]
    assert compute["compute_saved"] == pytest.approx(
        1 - compute["flops"] / compute["flops_max_depth"])


def test_completion_matches_offline_greedy(client, offline):
    result = client.completions.create(model=MODEL_NAME, prompt="The loop", max_tokens=6,
                                       extra_body={"ignore_eos": True}, **GREEDY)
    expected = offline.generate(["The loop"], SamplingParams(max_tokens=6, temperature=0.0,
                                                             ignore_eos=True))[0]
    assert result.choices[0].text == expected.text
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids) == 9
    assert result.usage.completion_tokens == 6
    assert result.usage.total_tokens == 15
    check_compute(result.usage.model_extra["compute"])
    CompletionResponse.model_validate(result.model_dump())


def test_streamed_completion_equals_the_whole_one(client):
    kwargs = dict(model=MODEL_NAME, prompt="stream me", max_tokens=8,
                  extra_body={"ignore_eos": True}, **GREEDY)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True,
                                            stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    final = chunks[-1]
    assert final.choices == [] and final.usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    check_compute(final.usage.model_extra["compute"])


def test_chat_matches_offline_greedy_streaming_and_not(client, offline):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids = offline.tokenizer.apply_chat_template(messages)
    expected = offline.generate([ids], SamplingParams(max_tokens=5, temperature=0.0,
                                                      ignore_eos=True))[0]
    kwargs = dict(model=MODEL_NAME, messages=messages, max_tokens=5,
                  extra_body={"ignore_eos": True}, **GREEDY)
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected.text
    assert whole.usage.prompt_tokens == len(ids)
    ChatCompletionResponse.model_validate(whole.model_dump())
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_async_client_serves_concurrent_requests(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        extra = {"extra_body": {"ignore_eos": True}}
        plain = [client.completions.create(model=MODEL_NAME, prompt=f"p{i}", max_tokens=4,
                                           **extra) for i in range(4)]
        chats = [client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": f"c{i}"}], max_tokens=4,
            **extra) for i in range(4)]
        results = await asyncio.gather(*plain, *chats)
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "s"}], max_tokens=4,
            stream=True, stream_options={"include_usage": True}, **extra)
        chunks = [c async for c in stream]
        await client.close()
        return results, chunks

    results, chunks = asyncio.run(main())
    assert all(r.usage.completion_tokens == 4 for r in results)
    assert chunks[-1].usage.completion_tokens == 4
    server.assert_no_blocks_owned()


def test_n_choices_with_seed_are_reproducible(client):
    kwargs = dict(model=MODEL_NAME, prompt="n", max_tokens=5, n=3, seed=11,
                  extra_body={"ignore_eos": True})
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 15


def test_streaming_n_choices_carry_their_index(http):
    chunks = stream_json(http, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "n": 2,
        "ignore_eos": True})
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    finished = {c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]}
    assert finished == {0, 1}


def test_completion_logprobs(client):
    result = client.completions.create(model=MODEL_NAME, prompt="lp", max_tokens=4, logprobs=2,
                                       extra_body={"ignore_eos": True}, **GREEDY)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    # greedy: the chosen token is the most likely one
    assert all(lp >= max(top.values()) - 1e-5
               for lp, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True))


def test_chat_logprobs_with_top_logprobs(client):
    result = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "q"}], max_tokens=3,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = result.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(entry.top_logprobs) == 3 and entry.bytes is not None for entry in content)


def test_echo_and_several_prompts(client):
    result = client.completions.create(model=MODEL_NAME, prompt=["ab", "cd"], n=2, echo=True,
                                       max_tokens=3, extra_body={"ignore_eos": True})
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    assert [c.text[:2] for c in result.choices] == ["ab", "ab", "cd", "cd"]
    assert result.usage.prompt_tokens == 6 and result.usage.completion_tokens == 12
    check_compute(result.usage.model_extra["compute"])


def test_streaming_several_prompts_loses_no_delta(http):
    body = {"prompt": ["one", "two", "three"], "n": 2, "max_tokens": 6, "temperature": 0.0,
            "ignore_eos": True}
    whole = http.post("/v1/completions", json=body).json()
    texts: dict[int, str] = {}
    finished = set()
    for chunk in stream_json(http, "/v1/completions", body):
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            if choice["finish_reason"]:
                finished.add(choice["index"])
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert finished == set(range(6))


def test_token_id_prompts(client):
    one = client.completions.create(model=MODEL_NAME, prompt=[257, 104, 105], max_tokens=2)
    many = client.completions.create(model=MODEL_NAME, prompt=[[257, 104], [257, 105, 106]],
                                     max_tokens=2)
    assert one.usage.prompt_tokens == 3
    assert many.usage.prompt_tokens == 5 and len(many.choices) == 2


def test_stop_string_cuts_the_text(client):
    kwargs = dict(model=MODEL_NAME, prompt="stop here", max_tokens=24,
                  extra_body={"ignore_eos": True}, **GREEDY)
    text = client.completions.create(**kwargs).choices[0].text
    stop = next(ch for ch in text[2:] if ch.isprintable() and ch != "\ufffd")
    cut = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert cut.text == text[:text.index(stop)]
    assert cut.finish_reason == "stop"
    assert cut.model_extra["stop_reason"] == stop


def test_max_loops_and_halt_threshold_change_the_compute(http):
    def compute(**extra) -> dict:
        body = {"prompt": "knob", "max_tokens": 4, "ignore_eos": True, **extra}
        return http.post("/v1/completions", json=body).json()["usage"]["compute"]

    one_loop = compute(max_loops=1)
    assert one_loop["max_loops"] == 1
    assert one_loop["loops_per_layer"] == [1.0, 1.0]
    full = compute(halt_threshold=0.0)  # never halts early: every token runs N loops
    assert full["mean_loops_per_token"] == 3.0


def test_models_tokenize_detokenize_version(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    card = client.models.retrieve(MODEL_NAME)
    assert card.model_extra["max_loops"] == 3 and card.model_extra["max_model_len"] == 256
    tokens = http.post("/tokenize", json={"prompt": "hi"}).json()
    assert tokens == {"count": 3, "max_model_len": 256, "tokens": [257, 104, 105]}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"][0] == 257 and chat["count"] == 6
    assert http.post("/detokenize", json={"tokens": [104, 105]}).json() == {"prompt": "hi"}
    assert http.get("/version").json()["version"]
    assert http.get("/health").json() == {"status": "ok"}


def test_request_id_is_echoed_or_generated(http):
    given = http.get("/health", headers={"X-Request-Id": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"
    made = http.get("/health")
    assert len(made.headers["x-request-id"]) == 32
    bad = http.get("/health", headers={"X-Request-Id": "has spaces"})
    assert bad.headers["x-request-id"] != "has spaces"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_access_log_is_one_json_line_per_request(http):
    access, lines = logging.getLogger("loopserve.access"), Lines()
    access.addHandler(lines)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        http.post("/v1/completions", json={"prompt": "log", "max_tokens": 2},
                  headers={"X-Request-Id": "log-me"})
        deadline = time.monotonic() + 5
        while not lines.lines and time.monotonic() < deadline:
            time.sleep(0.01)  # the line is written just after the response is sent
    finally:
        access.removeHandler(lines)
        access.setLevel(level)
    records = [json.loads(line) for line in lines.lines]
    record = next(r for r in records if r["request_id"] == "log-me")
    assert record["status"] == 200 and record["completion_tokens"] >= 1
    assert record["prompt_tokens"] == 4 and record["latency_s"] > 0
    assert 1.0 <= record["mean_loops_per_token"] <= 3.0

