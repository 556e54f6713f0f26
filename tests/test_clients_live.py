"""`Client`, `AsyncClient` and `loopserve complete|chat` against a real loopserve server (the
server tests' tiny checkpoint on uvicorn, on a free local port): completions and chat,
streamed and not, the compute in usage, typed errors with the server's message, API keys."""

from __future__ import annotations

import asyncio
import io

import pytest

import loopserve_cli
from clients import (
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    Client,
    Completion,
    NotFoundError,
)
from clients.cli import chat_turn
from clients.cli import main as cli_main
from tests.server_helpers import MODEL_NAME, LiveServer, make_checkpoint

GREEDY = {"temperature": 0.0, "max_tokens": 6, "ignore_eos": True}
API_KEY = "sk-test-key"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("clients-live"))


@pytest.fixture(scope="module")
def server(checkpoint):
    with LiveServer(checkpoint) as live:
        yield live


@pytest.fixture(scope="module")
def keyed_server(checkpoint):
    with LiveServer(checkpoint, api_keys=(API_KEY,)) as live:
        yield live


@pytest.fixture
def client(server):
    with Client(server.url, max_retries=0, timeout=30) as c:
        yield c


def check_usage(out: Completion | None, usage, completion_tokens: int = 6) -> None:
    assert usage.completion_tokens == completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + completion_tokens
    compute = usage.compute
    assert compute is not None and compute.max_loops == 3
    assert len(compute.loops_per_layer) == len(compute.memory_gate_per_layer) == 2
    assert 1.0 <= compute.mean_loops_per_token <= 3.0
    assert compute.compute_saved == pytest.approx(1 - compute.flops / compute.flops_max_depth)
    if out is not None:
        assert out.compute is compute and out.request_id


def test_sync_completion_streamed_and_not(client):
    whole = client.complete("The loop", **GREEDY)
    assert whole.model == MODEL_NAME and whole.finish_reason == "length"
    check_usage(whole, whole.usage)
    with client.stream_complete("The loop", **GREEDY) as stream:
        text = "".join(chunk.text for chunk in stream)
    assert text == whole.text and stream.request_id
    check_usage(None, stream.usage)


def test_sync_chat_streamed_and_not(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat(messages, **GREEDY)
    check_usage(whole, whole.usage)
    stream = client.stream_chat(messages, **GREEDY)
    chunks = list(stream)
    assert "".join(c.text for c in chunks) == whole.text
    assert any(c.finish_reason == "length" for c in chunks)
    check_usage(None, stream.usage)


def test_async_client_every_path(server):
    async def run() -> None:
        async with AsyncClient(server.url, max_retries=0, timeout=30) as client:
            whole = await client.complete("The loop", **GREEDY)
            stream = await client.stream_complete("The loop", **GREEDY)
            assert "".join([c.text async for c in stream]) == whole.text
            check_usage(whole, whole.usage)
            check_usage(None, stream.usage)
            chat = await client.chat("Hi", **GREEDY)
            chat_stream = await client.stream_chat("Hi", **GREEDY)
            async with chat_stream:
                assert "".join([c.text async for c in chat_stream]) == chat.text
            check_usage(None, chat_stream.usage)
            assert [m.id for m in await client.models()] == [MODEL_NAME]
            assert await client.health()
            with pytest.raises(BadRequestError, match="max_loops"):
                await client.stream_complete("x", max_loops=99)

    asyncio.run(run())


def test_compute_knobs_reach_the_server(client):
    shallow = client.complete("The loop", max_loops=1, **GREEDY).compute
    assert shallow.max_loops == 1 and shallow.loops_per_layer == (1.0, 1.0)


def test_errors_are_typed_with_the_server_message(client):
    with pytest.raises(BadRequestError, match="max_loops") as info:
        client.complete("The loop", max_loops=99)
    assert info.value.status_code == 400 and info.value.param == "max_loops"
    assert info.value.type == "invalid_request_error"
    with pytest.raises(NotFoundError, match="does not exist"):
        client.stream_chat("Hi", extra_body={"model": "no-such-model"})
    with pytest.raises(BadRequestError, match="temperature"):
        client.chat("Hi", temperature=-1.0)
    with Client("http://127.0.0.1:9", max_retries=0, connect_timeout=2) as nowhere:
        with pytest.raises(APIConnectionError, match="could not reach"):
            nowhere.complete("x")
        assert not nowhere.health()


def test_models_health_metrics(client):
    models = client.models()
    assert [m.id for m in models] == [MODEL_NAME] and models[0].n_layers == 2
    assert client.health()
    assert "loopserve_request_mean_loops_per_token" in client.metrics()


def test_api_key(keyed_server):
    with Client(keyed_server.url, max_retries=0) as anonymous:
        with pytest.raises(AuthenticationError, match="API key") as info:
            anonymous.complete("x", max_tokens=1)
        assert info.value.status_code == 401
        assert anonymous.health()  # /health stays open
    with Client(keyed_server.url, api_key=API_KEY) as client:
        assert client.complete("x", max_tokens=2).usage.completion_tokens <= 2

    async def run() -> int:
        async with AsyncClient(keyed_server.url, api_key=API_KEY) as client:
            return len(await client.models())

    assert asyncio.run(run()) == 1


def test_cli_complete_streams_and_shows_compute(server, capsys):
    code = loopserve_cli.main(["complete", "The loop", "--url", server.url, "--max-tokens", "5",
                               "--temperature", "0", "--compute"])
    out, err = capsys.readouterr()
    assert code == 0 and out.endswith("\n")
    assert "loops/layer" in err and "saved" in err and "5 generated" in err


def test_cli_chat_one_shot_and_interactive(server, capsys, monkeypatch):
    assert cli_main(["chat", "-m", "Hi", "--url", server.url, "--max-tokens", "3",
                     "--max-loops", "2", "--compute"]) == 0
    assert "of max 2" in capsys.readouterr().err
    sent = []

    def recording_turn(client, history, args):
        sent.append([m["role"] for m in history])
        chat_turn(client, history, args)

    monkeypatch.setattr("clients.cli.chat_turn", recording_turn)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nHow?\n/reset\nHello\n\n"))
    assert cli_main(["chat", "--url", server.url, "--max-tokens", "3", "--system", "Brief."]) == 0
    # the conversation grows, and /reset keeps only the system message
    assert sent == [["system", "user"], ["system", "user", "assistant", "user"],
                    ["system", "user"]]


def test_cli_reports_server_errors(server, capsys):
    assert cli_main(["complete", "x", "--url", server.url, "--max-loops", "99"]) == 1
    assert "400" in capsys.readouterr().err
