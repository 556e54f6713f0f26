"""The engine core in its own process: the wire format, start-up errors, and what the server
does when the core dies or stops answering (error event on the stream, /health 503, new
requests 503, no hang), and that no core process outlives the server."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from engine.core_messages import (
    PROTOCOL_VERSION,
    AbortRequest,
    OutputBatch,
    ProtocolError,
    decode,
    encode,
)
from engine.core_process import STATS_SECONDS
from engine.request import CompletionOutput, RequestOutput
from tests.server_helpers import LiveServer, make_checkpoint, sse_events, stream_json
from tests.test_server_lifecycle import REPO, _free_port, _wait_healthy

LONG = {"prompt": "a long answer", "max_tokens": 200, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("engine-core"))


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def core_of(pid: int) -> tuple[int, list[int]]:
    """The engine-core child of a server and all its children (multiprocessing may add a
    resource tracker): none may outlive the server."""
    kids = children(pid)
    cores = [k for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
    assert len(cores) == 1, kids
    return cores[0], kids


def wait_until(predicate, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(0.02)
    return time.monotonic() - start


def test_messages_round_trip_and_carry_their_version():
    output = RequestOutput("r1", [1, 2], [CompletionOutput(0, [5], "x")], finished=False)
    batch = decode(encode(OutputBatch((output,), (), None)))
    assert batch.outputs[0].outputs[0].token_ids == [5]
    assert decode(encode(AbortRequest("r1"))) == AbortRequest("r1")
    import pickle
    stale = pickle.dumps((PROTOCOL_VERSION + 1, AbortRequest("r1")))
    with pytest.raises(ProtocolError, match=f"version {PROTOCOL_VERSION + 1} received"):
        decode(stale)


def test_a_bad_checkpoint_fails_start_up_with_its_message(checkpoint, tmp_path, capsys):
    from server.cli import main

    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    assert main(["serve", "--model", str(broken)]) == 2
    assert "model.safetensors is missing" in capsys.readouterr().err


def _stream_in_background(url: str, events: list[str], chunks: list[int]
                          ) -> threading.Thread:
    """Read a long stream into `events`; `chunks[0]` counts its lines as they come."""
    def lines(response: httpx.Response):
        for line in response.iter_lines():
            chunks[0] += 1
            yield line

    def read() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=LONG, timeout=30) as response:
            events.extend(sse_events(lines(response)))

    thread = threading.Thread(target=read)
    thread.start()
    return thread


def _assert_ends_with_503_event(events: list[str], message: str) -> None:
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "service_unavailable" and message in error["message"]
    assert len(events) > 3  # content came before the core went away


def _dies_mid_stream(server: LiveServer, http: httpx.Client, stop_the_core, message: str
                     ) -> None:
    """Stream, `stop_the_core(pid)`, then: /health 503 soon, naming `message`, the stream
    ends with a 503 event, new requests get 503 naming it, and the core is gone."""
    server.in_core("slow_steps", 0.01)
    pid = server.state.engine.core_pid
    events: list[str] = []
    chunks = [0]
    reader = _stream_in_background(server.url, events, chunks)
    wait_until(lambda: chunks[0] > 3, 10, "streaming")
    stop_the_core(pid)
    took = wait_until(lambda: http.get("/health").status_code == 503, 5, "/health 503")
    assert took < 3.0  # the limit is 0.5 s; the rest is slack for a busy machine
    health = http.get("/health").json()["error"]
    assert health["code"] == "engine_unavailable" and message in health["message"]
    reader.join(10)
    assert not reader.is_alive(), "the stream hung after the core stopped"
    _assert_ends_with_503_event(events, message)
    late = http.post("/v1/completions", json={"prompt": "late"})
    assert late.status_code == 503 and message in late.json()["error"]["message"]
    wait_until(lambda: not alive(pid), 5, "the stopped core is killed")


def test_killing_the_core_mid_stream_ends_the_stream_with_a_503_event(checkpoint):
    with LiveServer(checkpoint) as server, httpx.Client(base_url=server.url) as http:
        _dies_mid_stream(server, http, lambda pid: os.kill(pid, signal.SIGKILL),
                         "exit code -9")


def test_a_stuck_step_is_declared_dead_and_the_core_killed(checkpoint):
    with LiveServer(checkpoint, step_timeout=0.5) as server, \
            httpx.Client(base_url=server.url) as http:
        # the heartbeat thread keeps talking; the loop is stuck inside this hook
        _dies_mid_stream(server, http, lambda pid: server.state.engine.submit_to_core(
            "tests.core_hooks:block_loop", 30.0), "step is stuck")


def test_a_frozen_core_process_is_declared_dead_and_killed(checkpoint):
    with LiveServer(checkpoint, core_timeout=0.5) as server, \
            httpx.Client(base_url=server.url) as http:
        # SIGSTOP freezes every thread, the heartbeat too: only silence tells
        _dies_mid_stream(server, http, lambda pid: os.kill(pid, signal.SIGSTOP),
                         "process stopped answering")


def test_a_message_the_api_process_cannot_read_ends_the_core_with_a_503(checkpoint):
    """A frame that does not decode (a protocol mismatch, say) is not logged and skipped:
    the core is declared dead, naming why, and killed."""
    from engine.core_messages import PROTOCOL_VERSION

    with LiveServer(checkpoint) as server, httpx.Client(base_url=server.url) as http:
        engine = server.state.engine
        pid = engine.core_pid
        frame = pickle.dumps((PROTOCOL_VERSION + 1, None))
        engine._loop.call_soon_threadsafe(engine._on_frame, frame)
        wait_until(lambda: http.get("/health").status_code == 503, 5, "/health 503")
        message = http.get("/health").json()["error"]["message"]
        assert "cannot handle" in message and "ProtocolError" in message
        late = http.post("/v1/completions", json={"prompt": "late"})
        assert late.status_code == 503
        wait_until(lambda: not alive(pid), 5, "the core is killed")


def test_a_step_longer_than_the_core_timeout_is_not_a_hang(checkpoint):
    with LiveServer(checkpoint, core_timeout=0.8, step_timeout=30) as server, \
            httpx.Client(base_url=server.url) as http:
        server.in_core("slow_steps", 2.5)  # each step outlasts the core timeout threefold
        body = {"prompt": "hi", "max_tokens": 2, "ignore_eos": True}
        response = http.post("/v1/completions", json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2
        assert http.get("/health").status_code == 200


def _serve(checkpoint: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "LOOPSERVE_NUM_KV_BLOCKS": "128"}
    proc = subprocess.Popen(
        [sys.executable, "loopserve_cli.py", "serve", "--model", str(checkpoint), "--host",
         "127.0.0.1", "--port", str(port), "--block-size", "4", "--shutdown-timeout", "30"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, proc)
    return proc, url


def test_sigterm_after_the_core_died_exits_cleanly_with_no_orphan(checkpoint):
    proc, url = _serve(checkpoint)
    try:
        core, kids = core_of(proc.pid)
        os.kill(core, signal.SIGKILL)
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, 5, "/health 503")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        _, err = proc.communicate()
        assert "engine core is dead" in err and "exit code -9" in err
        wait_until(lambda: not any(map(alive, kids)), 5, "no child outlives the server")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_sigterm_drains_through_the_core_and_leaves_no_orphan(checkpoint):
    proc, url = _serve(checkpoint)
    try:
        _, kids = core_of(proc.pid)
        body = {"prompt": "drain me", "max_tokens": 60, "ignore_eos": True}
        result: list[httpx.Response] = []
        worker = threading.Thread(target=lambda: result.append(
            httpx.post(f"{url}/v1/completions", json=body, timeout=30)))
        worker.start()
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        worker.join(30)
        assert result[0].status_code == 200
        assert result[0].json()["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
        wait_until(lambda: not any(map(alive, kids)), 5, "no child outlives the server")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_the_core_dies_with_a_killed_server(checkpoint):
    """SIGKILL leaves the server no chance to stop its core: the core must notice."""
    proc, _ = _serve(checkpoint)
    _, kids = core_of(proc.pid)
    proc.kill()
    proc.communicate()
    wait_until(lambda: not any(map(alive, kids)), 5, "no child outlives a killed server")


def test_the_thread_engine_serves_the_same_tokens(checkpoint):
    """--engine-thread keeps the loop in the server's process; greedy output is the same."""
    from engine.async_engine import AsyncEngine

    body = {"prompt": "same tokens", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    texts = []
    for engine_thread in (False, True):
        with LiveServer(checkpoint, engine_thread=engine_thread) as server, \
                httpx.Client(base_url=server.url) as http:
            assert isinstance(server.state.engine, AsyncEngine) is engine_thread
            texts.append(http.post("/v1/completions", json=body).json()["choices"][0]["text"])
    assert texts[0] == texts[1] and texts[0]


def test_a_stop_string_found_in_the_api_process_ends_the_request_in_the_core(checkpoint):
    body = {"prompt": "stop here", "max_tokens": 150, "temperature": 0, "ignore_eos": True}
    with LiveServer(checkpoint) as server, httpx.Client(base_url=server.url,
                                                          timeout=30) as http:
        server.in_core("slow_steps", 0.005)  # 150 steps: ~1 s, many more on a busy machine
        text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        stop = next(ch for ch in text[3:] if ch.isprintable() and ch != "\ufffd")
        steps = server.in_core("num_steps")
        events = stream_json(http, "/v1/completions", {**body, "stop": [stop]})
        streamed = "".join(e["choices"][0]["text"] for e in events)
        assert streamed == text[:text.index(stop)]
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
        server.assert_no_blocks_owned()
        # aborted in the core at the stop, not run on to max_tokens
        assert server.in_core("num_steps") - steps < text.index(stop) + 10
        # a whole response with a stop string is watched delta by delta all the same
        steps = server.in_core("num_steps")
        whole = http.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
        assert (whole["text"], whole["finish_reason"]) == (text[:text.index(stop)], "stop")
        assert server.in_core("num_steps") - steps < text.index(stop) + 10
        server.assert_no_blocks_owned()


def test_the_core_step_statistics_and_ipc_cost_reach_the_api_registry(checkpoint):
    """Every step's statistics arrive; a whole response costs a few messages, not one per
    token (final-only output, statistics held until a batch goes out); a stream one per
    token."""
    body = {"prompt": "count", "max_tokens": 24, "ignore_eos": True}
    with LiveServer(checkpoint) as server, httpx.Client(base_url=server.url) as http:
        sample = server.state.metrics.registry.get_sample_value
        labels = {"model_name": "tiny-test"}

        def messages() -> float:
            return sample("loopserve_engine_core_messages_total", labels)

        def step_count() -> float:
            return sample("loopserve_engine_step_seconds_count", labels)

        before, steps, start = messages(), step_count(), time.monotonic()
        http.post("/v1/completions", json=body).raise_for_status()
        elapsed = time.monotonic() - start
        assert step_count() - steps == 24  # the prompt's step, then one per token
        assert sample("loopserve_layer_tokens_total", {**labels, "layer": "0"}) > 24
        # the add's answer, the final output, and statistics (or a heartbeat) at most every
        # STATS_SECONDS while the steps ran
        assert messages() - before <= 2 + math.ceil(elapsed / STATS_SECONDS)
        before = messages()
        stream_json(http, "/v1/completions", body)
        assert messages() - before >= 24  # a delta every step
        size = sample("loopserve_engine_core_bytes_total", labels)
        assert size > messages() * 50
        assert messages() <= server.state.engine.ipc_counts()[0]  # read live at scrape time


def test_the_core_freezes_its_start_up_heap_and_still_collects_new_garbage(checkpoint):
    """The model, torch and the tokenizer are never scanned again by a full collection;
    what serving allocates is still collected."""
    import gc

    from engine.gc_freeze import freeze_startup_heap

    with LiveServer(checkpoint) as server:
        assert server.in_core("frozen_objects") > 10_000
    try:
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count() > 0
        cycle: list = []
        cycle.append(cycle)  # garbage made after the freeze: a cycle only gc can free
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()


def test_the_core_writes_whole_messages_from_two_threads_and_a_gone_api_stops_the_loop():
    """The loop and the heartbeat both write: every message arrives whole (one lock), each
    thread's in its order; once the pipe is broken, a send raises and stops the loop."""
    import multiprocessing

    from engine.core_messages import CoreAlive, decode
    from engine.core_process import EngineCore
    from engine.core_wire import BlockingWire, socket_of
    from engine.llm_engine import LLMEngine
    from model.tokenizer import load_tokenizer
    from tests.helpers import make_model
    from tests.server_helpers import engine_config

    model = make_model()
    llm = LLMEngine(model, load_tokenizer(None, model.config), engine_config())
    api_end, core_end = multiprocessing.Pipe()
    api = BlockingWire(socket_of(api_end))
    core = EngineCore(llm, BlockingWire(socket_of(core_end)))

    def send_from_a_thread() -> None:
        for i in range(200):
            core._send(CoreAlive(1000.0 + i))

    seen: list[float] = []  # read meanwhile: a socket pair holds only ~200 small messages
    reader = threading.Thread(target=lambda: seen.extend(
        decode(api.recv()).loop_busy_s for _ in range(400)))
    other = threading.Thread(target=send_from_a_thread)
    reader.start()
    other.start()
    for i in range(200):
        core._send(CoreAlive(float(i)))
    other.join()
    reader.join(10)
    assert [x for x in seen if x < 1000] == [float(i) for i in range(200)]
    assert [x for x in seen if x >= 1000] == [1000.0 + i for i in range(200)]
    assert not api.poll(0.05) and not core.stop
    api.close()  # the API process is gone
    deadline = time.monotonic() + 5
    with pytest.raises(OSError):
        while time.monotonic() < deadline:
            core._send(CoreAlive(0.0))
    assert core.stop
