"""The IPC benchmark: both codecs bring the core's typed messages back, both transports carry
them (a short run; the figures come from the benchmark)."""

from __future__ import annotations

import pytest

from benchmarks.ipc_cost import decode_batches, main, msgpack_codec, pipe_cost, zmq_cost
from engine.core_messages import decode, encode

pytest.importorskip("msgpack")
pytest.importorskip("zmq")


def test_msgpack_and_pickle_bring_back_the_same_batch():
    (batch, *_), step_s = decode_batches(3, steps=1, logprobs=2)
    assert step_s > 0 and len(batch.outputs) == 3 and len(batch.stats) == 1
    enc, dec = msgpack_codec()
    for back in (dec(enc(batch)), decode(encode(batch))):
        assert [o.request_id for o in back.outputs] == [o.request_id for o in batch.outputs]
        assert [o.outputs[0].token_ids for o in back.outputs] == [
            o.outputs[0].token_ids for o in batch.outputs]
        assert back.status == batch.status
        assert back.stats[0].layer_iterations == batch.stats[0].layer_iterations
        assert _logprobs(back) == _logprobs(batch)  # msgpack: tuples come back as lists
    assert all(_logprobs(batch))  # every request's delta carries its logprobs


def _logprobs(batch) -> list:
    return [[(t.token_id, t.logprob, [tuple(x) for x in t.top_logprobs]) for t in
             o.outputs[0].logprobs] for o in batch.outputs]


def test_both_transports_deliver_and_the_run_reports_both_paths(capsys):
    for cost in (pipe_cost(b"x" * 100, 20), zmq_cost(b"x" * 100, 20)):
        assert cost["latency_us"] > 0 and cost["burst_us"] > 0
    (row,) = main(["--batch-sizes", "2", "--messages", "20", "--repeats", "2"])["results"]
    for path in ("pickle_pipe", "msgpack_zmq"):
        assert row[path]["bytes_per_token"] > 0 and row[path]["share_of_step"] > 0
    assert '"benchmark": "ipc_cost"' in capsys.readouterr().out
