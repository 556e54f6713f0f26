"""Prompt logprobs over HTTP, as lm-evaluation-harness and vLLM clients read them: `echo`
with `logprobs` on /v1/completions (max_tokens 0 and 1, text and token-id prompts, lists of
them, n choices, streaming) in OpenAI's legacy layout, vLLM's `prompt_logprobs` on both
routes, and their values against `reference_forward`'s log-softmax (fp32) in the served
semantics."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from model.tokenizer import ByteTokenizer
from model.weights import load_model
from tests.server_helpers import MODEL_NAME, LiveServer, make_checkpoint, stream_json

C, CHAT = "/v1/completions", "/v1/chat/completions"
TOL = 1e-4
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("server-logprobs"))


@pytest.fixture(scope="module")
def server(checkpoint):
    with LiveServer(checkpoint) as live:
        yield live


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def reference_logprobs(model, ids: list[int], halt_threshold: float | None) -> list[float]:
    """log p(ids[j] | ids[:j]) for j >= 1 from the uncached whole-sequence forward."""
    with torch.no_grad():
        logits = model.reference_forward(torch.tensor([ids]), halt_threshold=halt_threshold
                                         ).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[j - 1, ids[j]].item() for j in range(1, len(ids))]


def same_up_to_rounding(a, b, tol: float = 1e-5) -> bool:
    """Equal structures, floats within `tol`: two requests may run a (layer, step) in
    different exact forms (the form policy learns from every step), which changes float
    rounding only (a different row count through the same matmuls)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_up_to_rounding(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_up_to_rounding(x, y, tol)
                                        for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def echo(http, prompt, **extra) -> dict:
    body = {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0, **extra}
    response = http.post(C, json=body)
    assert response.status_code == 200, response.text
    return response.json()


# (request's halt_threshold, reference_forward's): the model's default, a coarser one, exact
SEMANTICS = {"default": (None, "default"), "coarse": (0.5, 0.5), "exact": (0.0, None)}


@pytest.mark.parametrize("semantics", list(SEMANTICS))
def test_echoed_prompt_logprobs_equal_the_reference(http, model, semantics):
    prompt = "12+35=47 and the capital"
    ids = TOK.encode(prompt, add_bos=True)
    requested, reference = SEMANTICS[semantics]
    extra = {} if requested is None else {"halt_threshold": requested}
    choice = echo(http, prompt, **extra)["choices"][0]
    threshold = model.config.halt_threshold if reference == "default" else reference
    expected = reference_logprobs(model, ids, threshold)
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=TOL)
    assert logprobs["tokens"] == [TOK.token_text(i) for i in ids]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"


def test_the_semantics_differ_beyond_the_tolerance(http):
    """The thresholds are really served: the parity test above can tell them apart."""
    def logprobs(threshold: float) -> list[float]:
        choice = echo(http, "adaptive or exact", halt_threshold=threshold)["choices"][0]
        return choice["logprobs"]["token_logprobs"][1:]

    coarse, exact = logprobs(0.5), logprobs(0.0)
    assert max(abs(a - b) for a, b in zip(coarse, exact, strict=True)) > 10 * TOL


def test_echo_with_max_tokens_1_appends_the_generated_token(http, model):
    prompt = "7+8="
    ids = TOK.encode(prompt, add_bos=True)
    result = echo(http, prompt, max_tokens=1, temperature=0.0, ignore_eos=True)
    logprobs = result["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 1
    expected = reference_logprobs(model, ids, model.config.halt_threshold)
    assert logprobs["token_logprobs"][1:-1] == pytest.approx(expected, abs=TOL)
    # greedy: the generated token is the argmax, so it equals its own top alternative
    assert logprobs["token_logprobs"][-1] == pytest.approx(max(logprobs["top_logprobs"][-1]
                                                               .values()), abs=1e-5)
    assert result["choices"][0]["text"].startswith(prompt)
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert logprobs["text_offset"][:len(ids)] == [0, *range(len(prompt))]
    assert result["usage"]["prompt_tokens"] == len(ids)
    assert result["usage"]["completion_tokens"] == 1


def test_top_logprobs_hold_the_most_likely_tokens(http, model):
    prompt = "ranked"
    ids = TOK.encode(prompt, add_bos=True)
    with torch.no_grad():
        logits = model.reference_forward(torch.tensor([ids]),
                                         halt_threshold=model.config.halt_threshold).logits[0]
    best = torch.log_softmax(logits.float(), -1).topk(3, dim=-1)
    top = echo(http, prompt, logprobs=3)["choices"][0]["logprobs"]["top_logprobs"]
    for j in range(1, len(ids)):
        assert list(top[j]) == [TOK.token_text(i) for i in best.indices[j - 1].tolist()]
        assert list(top[j].values()) == pytest.approx(best.values[j - 1].tolist(), abs=TOL)


def test_token_id_prompts_and_lists_of_prompts(http):
    """Token-id prompts get no <bos> from the server (as in vLLM): the client adds it."""
    ids = [[257, 104, 105], [104, 105, 33]]
    result = echo(http, ids, n=2)
    assert [c["index"] for c in result["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in result["choices"]]
    assert texts == ["hi", "hi", "hi!", "hi!"]
    first, third = result["choices"][0]["logprobs"], result["choices"][2]["logprobs"]
    assert first["tokens"] == ["<bos>", "h", "i"] and third["tokens"] == ["h", "i", "!"]
    # the same token after a different context has a different logprob
    assert first["token_logprobs"][2] != third["token_logprobs"][1]
    assert result["choices"][1]["logprobs"] == first  # the choices share their prompt's
    strings = echo(http, ["hi", "hi!"])
    assert same_up_to_rounding(strings["choices"][0]["logprobs"], first)
    assert result["usage"]["prompt_tokens"] == 6 and result["usage"]["completion_tokens"] == 0


def test_streamed_echo_carries_the_same_logprobs(http):
    body = {"prompt": ["stream", "two"], "echo": True, "logprobs": 1, "max_tokens": 2,
            "temperature": 0.0, "ignore_eos": True}
    whole = http.post(C, json=body).json()
    merged: dict[int, dict] = {}
    for chunk in stream_json(http, C, body):
        for choice in chunk["choices"]:
            into = merged.setdefault(choice["index"], {"text": "", "lp": {}})
            into["text"] += choice["text"]
            for key, values in (choice["logprobs"] or {}).items():
                into["lp"].setdefault(key, []).extend(values)
    for choice in whole["choices"]:
        assert merged[choice["index"]]["text"] == choice["text"]
        assert same_up_to_rounding(merged[choice["index"]]["lp"], choice["logprobs"])


def test_vllm_prompt_logprobs_on_completions(http):
    result = http.post(C, json={"prompt": "vllm", "max_tokens": 1, "prompt_logprobs": 2,
                                "logprobs": 0}).json()
    entries = result["choices"][0]["prompt_logprobs"]
    ids = TOK.encode("vllm", add_bos=True)
    assert len(entries) == len(ids) and entries[0] is None
    legacy = echo(http, "vllm")["choices"][0]["logprobs"]["token_logprobs"]
    for j, entry in enumerate(entries[1:], start=1):
        assert set(entry) >= {str(ids[j])} and 1 + 2 >= len(entry) >= 2
        own = entry[str(ids[j])]
        assert own["logprob"] == pytest.approx(legacy[j], abs=1e-6)
        assert own["decoded_token"] == TOK.token_text(ids[j])
        ranked = sorted((e for e in entry.values() if e["rank"] is not None),
                        key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked][:2] == [1, 2]
        assert ranked[0]["logprob"] >= ranked[-1]["logprob"]
    assert "prompt_logprobs" not in http.post(C, json={"prompt": "x", "max_tokens": 1}
                                              ).json()["choices"][0]


def test_vllm_prompt_logprobs_on_chat(http, server):
    messages = [{"role": "user", "content": "hi"}]
    ids = TOK.apply_chat_template(messages)
    body = {"messages": messages, "max_tokens": 1, "prompt_logprobs": 0}
    whole = http.post(CHAT, json=body).json()
    assert len(whole["prompt_logprobs"]) == len(ids) and whole["prompt_logprobs"][0] is None
    assert all(list(e) == [str(t)] for e, t in zip(whole["prompt_logprobs"][1:], ids[1:],
                                                   strict=True))
    chunks = stream_json(http, CHAT, body)
    assert same_up_to_rounding(chunks[0]["prompt_logprobs"], whole["prompt_logprobs"])
    assert all("prompt_logprobs" not in c for c in chunks[1:])


def test_prefix_cache_hit_still_yields_prompt_logprobs(http):
    prompt = "a prompt long enough to fill KV blocks"
    plain = {"prompt": prompt, "max_tokens": 1}
    http.post(C, json=plain)
    again = http.post(C, json=plain).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    first, second = echo(http, prompt), echo(http, prompt)
    a, b = first["choices"][0]["logprobs"], second["choices"][0]["logprobs"]
    assert None not in a["token_logprobs"][1:]
    assert same_up_to_rounding(a, b)
    assert not same_up_to_rounding(a, {**b, "token_logprobs": [None] + [
        x + 1e-3 for x in b["token_logprobs"][1:]]})  # the comparison can fail


def test_the_openai_sdk_reads_echoed_logprobs(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    result = client.completions.create(model=MODEL_NAME, prompt="sdk", echo=True, logprobs=1,
                                       max_tokens=0)
    logprobs = result.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and len(logprobs.tokens) == 4
    assert result.choices[0].text == "sdk"
    assert result.usage.prompt_tokens_details.cached_tokens == 0
    server.assert_no_blocks_owned()
