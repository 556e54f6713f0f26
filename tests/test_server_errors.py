"""Bad input gets an OpenAI error object with a 4xx status, never a 500 (table-driven), and
the server's guards: API key, body size limit, unknown routes and methods, CORS."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server_helpers import MODEL_NAME, LiveServer, make_checkpoint

C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
INVALID, NOT_FOUND = "invalid_request_error", "not_found_error"

# (name, path, body: a dict is sent as JSON, str or bytes as they are, status, type, param)
BAD_INPUTS = [
    ("malformed json", C, '{"prompt": "x",', 400, INVALID, None),
    ("body is an array", C, "[1, 2]", 400, INVALID, None),
    ("deeply nested json", C, '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", 400,
     INVALID, None),
    ("invalid utf-8", C, b'{"prompt": "\xff\xfe"}', 400, INVALID, None),
    ("nan temperature", C, '{"prompt": "x", "temperature": NaN}', 400, INVALID, "temperature"),
    ("missing prompt", C, {"max_tokens": 3}, 400, INVALID, "prompt"),
    ("missing messages", CHAT, {"max_tokens": 3}, 400, INVALID, "messages"),
    ("string max_tokens", C, {"prompt": "x", "max_tokens": "5"}, 400, INVALID, "max_tokens"),
    ("bool max_tokens", C, {"prompt": "x", "max_tokens": True}, 400, INVALID, "max_tokens"),
    ("string temperature", C, {"prompt": "x", "temperature": "hot"}, 400, INVALID,
     "temperature"),
    ("string stream", C, {"prompt": "x", "stream": "yes"}, 400, INVALID, "stream"),
    ("prompt of mixed types", C, {"prompt": [1, "a"]}, 400, INVALID, "prompt"),
    ("prompt as object", C, {"prompt": {"text": "x"}}, 400, INVALID, "prompt"),
    ("stop as number", C, {"prompt": "x", "stop": 3}, 400, INVALID, "stop"),
    ("empty prompt", C, {"prompt": ""}, 400, INVALID, "prompt"),
    ("empty prompt list", C, {"prompt": []}, 400, INVALID, "prompt"),
    ("empty token list", C, {"prompt": [[]]}, 400, INVALID, "prompt"),
    ("prompt over the context", C, {"prompt": "x" * 300}, 400, INVALID, "max_tokens"),
    ("prompt + max_tokens over the context", C, {"prompt": "x" * 200, "max_tokens": 100}, 400,
     INVALID, "max_tokens"),
    ("chat prompt fills the context", CHAT,
     {"messages": [{"role": "user", "content": "x" * 260}]}, 400, INVALID, "messages"),
    ("max_tokens 0", C, {"prompt": "x", "max_tokens": 0}, 400, INVALID, "max_tokens"),
    ("max_tokens negative", CHAT, {"messages": USER, "max_tokens": -1}, 400, INVALID,
     "max_tokens"),
    ("temperature < 0", C, {"prompt": "x", "temperature": -0.5}, 400, INVALID, "temperature"),
    ("top_p 0", C, {"prompt": "x", "top_p": 0}, 400, INVALID, "top_p"),
    ("top_p > 1", CHAT, {"messages": USER, "top_p": 1.5}, 400, INVALID, "top_p"),
    ("n 0", C, {"prompt": "x", "n": 0}, 400, INVALID, "n"),
    ("n too large", CHAT, {"messages": USER, "n": 1000}, 400, INVALID, "n"),
    ("logprobs too large", C, {"prompt": "x", "logprobs": 50}, 400, INVALID, "logprobs"),
    ("top_logprobs too large", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21},
     400, INVALID, "top_logprobs"),
    ("top_logprobs without logprobs", CHAT, {"messages": USER, "top_logprobs": 2}, 400,
     INVALID, "top_logprobs"),
    ("halt_threshold 1", C, {"prompt": "x", "halt_threshold": 1.0}, 400, INVALID,
     "halt_threshold"),
    ("halt_threshold negative", CHAT, {"messages": USER, "halt_threshold": -0.1}, 400, INVALID,
     "halt_threshold"),
    ("max_loops 0", C, {"prompt": "x", "max_loops": 0}, 400, INVALID, "max_loops"),
    ("max_loops over N", CHAT, {"messages": USER, "max_loops": 4}, 400, INVALID, "max_loops"),
    ("unknown model", C, {"model": "gpt-9", "prompt": "x"}, 404, NOT_FOUND, "model"),
    ("unknown chat model", CHAT, {"model": "gpt-9", "messages": USER}, 404, NOT_FOUND, "model"),
    ("token id over the vocabulary", C, {"prompt": [1, 264]}, 400, INVALID, "prompt"),
    ("negative token id", C, {"prompt": [[5, -1]]}, 400, INVALID, "prompt"),
    ("too many stop strings", C, {"prompt": "x", "stop": [str(i) for i in range(17)]}, 400,
     INVALID, "stop"),
    ("empty stop string", C, {"prompt": "x", "stop": [""]}, 400, INVALID, "stop"),
    ("stop token over the vocabulary", C, {"prompt": "x", "stop_token_ids": [999]}, 400,
     INVALID, "stop_token_ids"),
    ("seed over int64", C, {"prompt": "x", "seed": 2**70}, 400, INVALID, "seed"),
    ("top_k -2", C, {"prompt": "x", "top_k": -2}, 400, INVALID, "top_k"),
    ("min_p > 1", C, {"prompt": "x", "min_p": 2.0}, 400, INVALID, "min_p"),
    ("repetition_penalty 0", C, {"prompt": "x", "repetition_penalty": 0}, 400, INVALID,
     "repetition_penalty"),
    ("presence_penalty 3", CHAT, {"messages": USER, "presence_penalty": 3}, 400, INVALID,
     "presence_penalty"),
    ("too many prompts", C, {"prompt": ["x"] * 65}, 400, INVALID, "prompt"),
    ("suffix", C, {"prompt": "x", "suffix": "y"}, 400, INVALID, "suffix"),
    ("best_of", C, {"prompt": "x", "best_of": 3}, 400, INVALID, "best_of"),
    ("n not whole", C, {"prompt": "x", "n": 1.5}, 400, INVALID, "n"),
    ("max_tokens not whole", CHAT, {"messages": USER, "max_tokens": 4.5}, 400, INVALID,
     "max_tokens"),
    ("max_tokens infinite", C, '{"prompt": "x", "max_tokens": Infinity}', 400, INVALID,
     "max_tokens"),
    ("max_tokens 0 without prompt logprobs", C, {"prompt": "x", "max_tokens": 0, "echo": True},
     400, INVALID, "max_tokens"),
    ("logit_bias over 100", C, {"prompt": "x", "logit_bias": {"5": 101}}, 400, INVALID,
     "logit_bias"),
    ("logit_bias under -100", CHAT, {"messages": USER, "logit_bias": {"5": -100.5}}, 400,
     INVALID, "logit_bias"),
    ("logit_bias key not a token id", C, {"prompt": "x", "logit_bias": {"a": 1}}, 400, INVALID,
     "logit_bias"),
    ("logit_bias token over the vocabulary", C, {"prompt": "x", "logit_bias": {"264": 1}}, 400,
     INVALID, "logit_bias"),
    ("logit_bias value a string", C, {"prompt": "x", "logit_bias": {"5": "up"}}, 400, INVALID,
     "logit_bias"),
    ("min_tokens over max_tokens", C, {"prompt": "x", "max_tokens": 2, "min_tokens": 3}, 400,
     INVALID, "min_tokens"),
    ("min_tokens negative", CHAT, {"messages": USER, "min_tokens": -1}, 400, INVALID,
     "min_tokens"),
    ("priority not an integer", C, {"prompt": "x", "priority": "high"}, 400, INVALID,
     "priority"),
    ("priority under fcfs scheduling", CHAT, {"messages": USER, "priority": 2}, 400, INVALID,
     "priority"),
    ("prompt_logprobs 21", C, {"prompt": "x", "prompt_logprobs": 21}, 400, INVALID,
     "prompt_logprobs"),
    ("prompt_logprobs negative", CHAT, {"messages": USER, "prompt_logprobs": -1}, 400, INVALID,
     "prompt_logprobs"),
    ("echo logprobs 21", C, {"prompt": "x", "echo": True, "logprobs": 21, "max_tokens": 0}, 400,
     INVALID, "logprobs"),
    ("empty messages", CHAT, {"messages": []}, 400, INVALID, "messages"),
    ("unknown role", CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, INVALID,
     "messages"),
    ("message without content", CHAT, {"messages": [{"role": "user"}]}, 400, INVALID,
     "messages"),
    ("content of wrong type", CHAT, {"messages": [{"role": "user", "content": 7}]}, 400,
     INVALID, "messages"),
    ("image content part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, INVALID, "messages"),
    ("message not an object", CHAT, {"messages": ["hi"]}, 400, INVALID, "messages"),
    ("tools", CHAT, {"messages": USER, "tools": [{"type": "function"}]}, 400, INVALID, "tools"),
    ("json response format", CHAT, {"messages": USER, "response_format": {"type": "json_object"}},
     400, INVALID, "response_format"),
    ("tokenize nothing", "/tokenize", {}, 400, INVALID, "prompt"),
    ("detokenize over the vocabulary", "/detokenize", {"tokens": [300]}, 400, INVALID,
     "tokens"),
    ("detokenize strings", "/detokenize", {"tokens": ["a"]}, 400, INVALID, "tokens"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("server-errors"))


@pytest.fixture(scope="module")
def server(checkpoint):
    with LiveServer(checkpoint) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def check_error(response: httpx.Response, status: int, type_: str, param: str | None = None
                ) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_ and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(("name", "path", "body", "status", "type_", "param"), BAD_INPUTS,
                         ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_gets_an_openai_error(http, name, path, body, status, type_, param):
    if isinstance(body, (str, bytes)):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    check_error(response, status, type_, param)


def test_bad_input_leaves_the_engine_healthy(server, http):
    assert http.get("/health").status_code == 200
    assert http.post(C, json={"prompt": "still fine", "max_tokens": 2}).status_code == 200
    server.assert_no_blocks_owned()


def test_the_sdk_raises_typed_errors(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_NAME, prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)


def test_unknown_route_and_method(http):
    check_error(http.get("/v1/nothing"), 404, NOT_FOUND)
    check_error(http.post("/v1/models", json={}), 405, INVALID)
    check_error(http.get("/v1/models/other-model"), 404, NOT_FOUND, "model")


def test_api_key_guards_everything_but_health_and_metrics(checkpoint):
    with LiveServer(checkpoint, api_keys=("k1", "k2")) as live, \
            httpx.Client(base_url=live.url) as http:
        check_error(http.get("/v1/models"), 401, "authentication_error")
        bad = http.get("/v1/models", headers={"Authorization": "Bearer k3"})
        assert check_error(bad, 401, "authentication_error")["code"] == "invalid_api_key"
        check_error(http.get("/v1/models", headers={"Authorization": "Basic k1"}), 401,
                    "authentication_error")
        assert http.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="k1", max_retries=0)
        assert client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=1).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{live.url}/v1", api_key="no", max_retries=0
                          ).models.list()


def test_body_size_limit_and_cors(checkpoint):
    with LiveServer(checkpoint, max_body_bytes=200, allowed_origins=("https://ui.example",)
                    ) as live, httpx.Client(base_url=live.url) as http:
        check_error(http.post(C, json={"prompt": "x" * 300}), 413, "request_too_large")

        def chunked():
            yield b'{"prompt": "'
            yield b"y" * 300
            yield b'"}'

        check_error(http.post(C, content=chunked(), headers={"content-type": "application/json"}),
                    413, "request_too_large")
        assert http.post(C, json={"prompt": "ok", "max_tokens": 1}).status_code == 200
        preflight = http.options(C, headers={"Origin": "https://ui.example",
                                             "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
        plain = http.get("/health", headers={"Origin": "https://ui.example"})
        assert plain.headers["access-control-allow-origin"] == "https://ui.example"
        other = http.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
