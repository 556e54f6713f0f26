"""What common clients send and read: whole-number floats for integer fields, the
over-context 400's code, min_tokens, logit_bias, priority, cached tokens in usage, vLLM's
/tokenizer_info read by lm-evaluation-harness's own remote tokenizer, the vLLM-named gauges
routers scrape, and an OpenAPI document that says what the server does."""

from __future__ import annotations

import json

import httpx
import pytest

from model.tokenizer import ByteTokenizer
from server.params import sampling_params
from server.schemas import ChatCompletionRequest, CompletionRequest
from tests.server_helpers import LiveServer, engine_config, make_checkpoint

C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("server-requests"))


@pytest.fixture(scope="module")
def server(checkpoint):
    with LiveServer(checkpoint) as live:
        yield live


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_whole_number_floats_are_integers(http):
    result = http.post(C, json={"prompt": "x", "n": 2.0, "max_tokens": 4.0, "logprobs": 1.0,
                                "ignore_eos": True, "seed": 3.0}).json()
    assert len(result["choices"]) == 2 and result["usage"]["completion_tokens"] == 8
    chat = http.post(CHAT, json={"messages": USER, "max_completion_tokens": 3.0,
                                 "top_logprobs": 2.0, "logprobs": True, "ignore_eos": True})
    assert chat.status_code == 200, chat.text
    assert len(chat.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "n": 2.5}, "n"), ({"prompt": "x", "max_tokens": 4.2}, "max_tokens"),
    ({"prompt": "x", "top_k": 1.5}, "top_k"), ({"prompt": "x", "seed": 0.5}, "seed")])
def test_non_whole_floats_are_a_400_naming_the_field(http, body, param):
    response = http.post(C, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and "integer" in error["message"]


def test_over_the_context_is_context_length_exceeded(http):
    for path, body in [(C, {"prompt": "x" * 250, "max_tokens": 16}),
                       (C, {"prompt": [104] * 256, "max_tokens": None}),
                       (CHAT, {"messages": [{"role": "user", "content": "x" * 260}]})]:
        response = http.post(path, json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "context_length_exceeded"


def test_logit_bias_steers_every_token(http):
    forced = http.post(C, json={"prompt": "x", "max_tokens": 5, "logit_bias": {"65": 100},
                                **GREEDY}).json()
    assert forced["choices"][0]["text"] == "AAAAA"
    banned = http.post(C, json={"prompt": "x", "max_tokens": 5, "ignore_eos": True, **GREEDY,
                                "logit_bias": {str(i): -100 for i in range(264) if i != 66}}
                       ).json()
    assert banned["choices"][0]["text"] == "BBBBB"


def test_min_tokens_holds_eos_back(http):
    eos_first = {"prompt": "x", "max_tokens": 6, "logit_bias": {"258": 100}, **GREEDY}
    early = http.post(C, json=eos_first).json()
    assert early["choices"][0]["finish_reason"] == "stop"
    assert early["usage"]["completion_tokens"] == 1
    held = http.post(C, json={**eos_first, "min_tokens": 3}).json()
    assert held["usage"]["completion_tokens"] == 4  # three held back, then the eos
    assert held["choices"][0]["finish_reason"] == "stop"


def test_vllm_fields_reach_the_sampling_params():
    body = CompletionRequest.model_validate({
        "prompt": "x", "priority": -3, "min_tokens": 2, "logit_bias": {"7": -1.5, "9": 2},
        "prompt_logprobs": 4, "echo": True, "logprobs": 6})
    params = sampling_params(body, 8, body.logprobs)
    assert (params.priority, params.min_tokens) == (-3, 2)
    assert params.logit_bias == ((7, -1.5), (9, 2.0))
    assert params.prompt_logprobs == 6  # the larger of vLLM's count and the echo's logprobs
    chat = ChatCompletionRequest.model_validate({"messages": USER, "priority": 1.0})
    assert sampling_params(chat, 4, None).prompt_logprobs is None
    assert sampling_params(chat, 4, None).priority == 1


def test_priority_is_served_under_the_priority_policy(checkpoint):
    with LiveServer(checkpoint, engine_config(scheduling_policy="priority")) as live, \
            httpx.Client(base_url=live.url, timeout=60) as http:
        for priority in (-5, 0, 7.0):
            response = http.post(C, json={"prompt": "x", "max_tokens": 2, "priority": priority})
            assert response.status_code == 200, response.text


def test_cached_tokens_in_usage(http):
    body = {"prompt": "the same long prompt, twice over", "max_tokens": 1}
    first = http.post(C, json=body).json()["usage"]
    second = http.post(C, json=body).json()["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    # the block size is 4: every full block of the prompt, less the one recomputed last
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < second["prompt_tokens"] and cached % 4 == 0
    stream = http.post(C, json={**body, "stream": True,
                                "stream_options": {"include_usage": True}})
    assert f'"prompt_tokens_details":{{"cached_tokens":{cached}}}' in stream.text


def test_tokenizer_info_serves_lm_evals_remote_tokenizer(server, http):
    from lm_eval.utils import RemoteTokenizer

    info = http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (info["bos_token"], info["eos_token"], info["model_max_length"]) == (
        "<bos>", "<eos>", 256)
    remote = RemoteTokenizer(server.url)
    assert (remote.bos_token_id, remote.eos_token_id) == (257, 258)
    assert remote.encode("12+35=") == list(b"12+35=")
    assert remote.decode([49, 43, 50]) == "1+2"
    messages = [{"role": "system", "content": "brief"}, {"role": "user", "content": "1+2?"}]
    rendered = remote.apply_chat_template(messages)
    assert remote.encode(rendered) == ByteTokenizer().apply_chat_template(messages)


def test_vllm_named_gauges_for_routers(server, http):
    text = http.get("/metrics").text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(("vllm:", "loopserve_num_requests", "loopserve_kv_cache"))}
    assert values["vllm:num_requests_waiting"] == values["loopserve_num_requests_waiting"]
    assert values["vllm:num_requests_running"] == values["loopserve_num_requests_running"]
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        assert values[name] == values["loopserve_kv_cache_usage_ratio"]
    assert 'vllm:num_requests_waiting{model_name="tiny-test"}' in text


def test_kv_gauge_alias_reads_the_pool_live(server):
    server.wait_idle()
    usage, _ = server.in_core("block_pool")
    gauge = server.state.metrics.registry.get_sample_value
    assert gauge("vllm:kv_cache_usage_perc", {"model_name": "tiny-test"}) == usage


def test_openapi_says_what_the_server_does(http):
    doc = http.get("/openapi.json").json()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (method, path)
    completions = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert completions["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse")
    assert "text/event-stream" in completions["200"]["content"]
    assert {"429", "503", "504"} <= set(completions)
    schemas = doc["components"]["schemas"]
    fields = schemas["CompletionRequest"]["properties"]
    max_tokens = [b for b in fields["max_tokens"]["anyOf"] if b.get("type") == "integer"][0]
    assert (max_tokens["minimum"], max_tokens["maximum"]) == (0, 256)
    assert [b for b in fields["max_loops"]["anyOf"] if b.get("type") == "integer"][0][
        "maximum"] == 3
    assert "CompletionChunk" in schemas and "ValidationError" not in schemas
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {
        "text/plain", "application/openmetrics-text"}


def test_tokenizer_info_of_a_hugging_face_checkpoint(tmp_path):
    """A checkpoint with its own tokenizer.json: the info names its tokens and renders its
    role markers, and the template's text tokenizes to the server's chat ids."""
    import jinja2
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from model.config import ModelConfig
    from model.tokenizer import load_tokenizer
    from server.routes_misc import tokenizer_info

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "[SYS]", "[USER]", "[BOT]"]
    hf.train_from_iterator(["what is 1+2", "the capital"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    markers = {"system": "[SYS]", "user": "[USER]", "assistant": "[BOT]"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"role_markers": markers}))
    tok = load_tokenizer(tmp_path, ModelConfig(vocab_size=hf.get_vocab_size(), tokenizer="hf",
                                               pad_token_id=0, bos_token_id=1, eos_token_id=2))
    info = tokenizer_info(tok, 128)
    assert (info["bos_token"], info["eos_token"], info["model_max_length"]) == ("<s>", "</s>",
                                                                               128)
    messages = [{"role": "user", "content": "what is 1+2"}]
    text = jinja2.Template(info["chat_template"]).render(messages=messages,
                                                         add_generation_prompt=True)
    assert text == "<s>[USER]what is 1+2</s>[BOT]"
    assert tok.encode_special_names(text) == tok.apply_chat_template(messages)
