"""What one engine-core message costs: pickle over a socket pair (a multiprocessing pipe: the
transport loopserve ships, which frames the same socket pair itself) against msgpack over
ZMQ (what vLLM v1 uses), on the core's real messages.

The bundled model serves B greedy requests offline (the core's own `LLMEngine`, no
detokenizer); after the prompts, each decode step's outputs become the `OutputBatch` the core
would send (prompt ids left out, step statistics and status included). For each B:

- codec: encode and decode time (best of repeats) and bytes of that batch, by pickle
  (`core_messages.encode/decode`) and by msgpack with a dataclass extension type (the typed
  objects come back, as the API process needs them);
- transport, through a `multiprocessing` pipe and through a ZMQ pair over `ipc://`, with a
  child process: latency (half the round trip of a one-byte ping answered by the batch's
  bytes: the core sends one message per step to a receiver that waits for it, so this is
  the figure that counts) and, for reference, burst time per message (the child streams
  them back to back, which lets ZMQ's I/O thread batch);
- the engine step's own time, and each path's whole per-message cost as a share of it.

    python -m benchmarks.ipc_cost                 # B = 1, 8, 32, 64
    python -m benchmarks.ipc_cost --batch-sizes 64 --messages 2000

msgpack and pyzmq are dev dependencies; without them that path is reported as missing.
The msgpack codec brings tuples back as lists (the typed objects are otherwise equal).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.machine import machine_name
from engine.core_messages import CoreStatus, OutputBatch, decode, encode
from engine.engine_config import EngineConfig
from engine.llm_engine import LLMEngine, StepStats
from engine.request import CompletionOutput, RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams

DATACLASSES = (OutputBatch, RequestOutput, CompletionOutput, TokenLogprob, StepStats,
               CoreStatus)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--messages", type=int, default=1000, help="sent per transport")
    parser.add_argument("--repeats", type=int, default=200, help="codec timings, best of")
    parser.add_argument("--logprobs", type=int, default=0,
                        help="top logprobs each request asks for (0: none, the common case)")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- real messages
def decode_batches(batch: int, steps: int = 4, logprobs: int = 0
                   ) -> tuple[list[OutputBatch], float]:
    """The `OutputBatch` of `steps` decode steps with `batch` requests (on the CPU), and the
    best step time (seconds) among them."""
    llm = LLMEngine.from_pretrained(None, EngineConfig(device="cpu"), detokenize=False)
    kept: list[StepStats] = []
    llm.stats_callback = kept.append
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True,
                            logprobs=logprobs or None)
    for i in range(batch):
        prompt = [ord(c) for c in f"{10 + i}+{i * 7 % 90}="]
        llm.add_request(llm.processor.prepared(f"cmpl-{i:04d}", prompt, params))
    llm.step()  # the prompts
    batches, best = [], float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        outputs = llm.step()
        best = min(best, time.perf_counter() - start)
        for output in outputs:
            output.prompt_token_ids = []  # as the core sends them
        status = CoreStatus(llm.num_waiting, llm.num_running, llm.block_manager.usage(),
                            batch, llm.num_steps)
        batches.append(OutputBatch(tuple(outputs), (kept[-1],), status))
    return batches, best


# ---------------------------------------------------------------------- msgpack codec
def msgpack_codec() -> tuple[Callable[[Any], bytes], Callable[[bytes], Any]] | None:
    """encode/decode of the message dataclasses as msgpack extension types, or None."""
    try:
        import msgpack
    except ImportError:
        return None
    codes = {cls: i for i, cls in enumerate(DATACLASSES)}

    def default(obj: Any) -> Any:
        fields = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
        return msgpack.ExtType(codes[type(obj)], msgpack.packb(fields, default=default))

    def ext_hook(code: int, data: bytes) -> Any:
        return DATACLASSES[code](*msgpack.unpackb(data, ext_hook=ext_hook,
                                                  strict_map_key=False))

    return (lambda m: msgpack.packb(m, default=default),
            lambda b: msgpack.unpackb(b, ext_hook=ext_hook, strict_map_key=False))


def codec_cost(messages: list[OutputBatch], codec: tuple[Callable, Callable],
               repeats: int) -> dict[str, float]:
    """Best encode and decode time per message (us) and mean bytes per message."""
    enc, dec = codec
    data = [enc(m) for m in messages]
    assert dec(data[0]).status == messages[0].status  # the typed object comes back
    return {"encode_us": _best_us(lambda: [enc(m) for m in messages], repeats, len(messages)),
            "decode_us": _best_us(lambda: [dec(d) for d in data], repeats, len(messages)),
            "bytes": sum(map(len, data)) / len(data)}


def _best_us(fn: Callable[[], object], repeats: int, per: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / per * 1e6


# ---------------------------------------------------------------------- transports
class _PipeEnd:
    """One end of a duplex multiprocessing pipe, as the transport interface."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def send(self, data: bytes) -> None:
        self.conn.send_bytes(data)

    def recv(self) -> bytes:
        return self.conn.recv_bytes()

    def close(self) -> None:
        self.conn.close()


class _ZmqEnd:
    """One end of a ZMQ PAIR socket over ipc:// (bind on the parent, connect on the child)."""

    def __init__(self, address: str, bind: bool) -> None:
        import zmq
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PAIR)
        (self.socket.bind if bind else self.socket.connect)(address)

    def send(self, data: bytes) -> None:
        self.socket.send(data, copy=False)

    def recv(self) -> bytes:
        return self.socket.recv(copy=False)

    def close(self) -> None:
        self.socket.close(linger=-1)
        self.context.term()


def _child(make: Callable[[], Any], payload: bytes, count: int) -> None:
    """The core's side: answer each ping with the payload, then stream `count` of them."""
    end = make()
    end.recv()  # the parent is ready
    for _ in range(count):
        end.recv()
        end.send(payload)
    for _ in range(count):
        end.send(payload)
    end.recv()  # the parent has everything
    end.close()


def _time_transport(end: Any, count: int) -> dict[str, float]:
    end.send(b"go")
    start = time.perf_counter()
    for _ in range(count):
        end.send(b"p")
        end.recv()
    round_trip = (time.perf_counter() - start) / count
    end.recv()  # the first of the burst: the child is streaming
    start = time.perf_counter()
    for _ in range(count - 1):
        end.recv()
    burst = (time.perf_counter() - start) / (count - 1)
    end.send(b"done")
    return {"latency_us": round_trip / 2 * 1e6, "burst_us": burst * 1e6}


def pipe_cost(payload: bytes, count: int) -> dict[str, float]:
    """Latency (half a ping/answer round trip) and burst time per message, in us, through
    a multiprocessing pipe."""
    parent, child_conn = mp.Pipe(duplex=True)
    child = mp.Process(target=_child, args=(lambda: _PipeEnd(child_conn), payload, count))
    child.start()
    result = _time_transport(_PipeEnd(parent), count)
    child.join()
    return result


def zmq_cost(payload: bytes, count: int) -> dict[str, float] | None:
    """The same through ZMQ PAIR sockets over ipc://, or None without pyzmq."""
    try:
        import zmq  # noqa: F401
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        address = f"ipc://{Path(tmp) / 'core.sock'}"
        end = _ZmqEnd(address, bind=True)
        child = mp.Process(target=_child,
                           args=(lambda: _ZmqEnd(address, bind=False), payload, count))
        child.start()
        result = _time_transport(end, count)
        child.join()
        end.close()
    return result


# ---------------------------------------------------------------------- the run
def measure(batch: int, args: argparse.Namespace) -> dict[str, Any]:
    messages, step_s = decode_batches(batch, logprobs=args.logprobs)
    row: dict[str, Any] = {"batch": batch, "step_us": step_s * 1e6}
    paths = {"pickle_pipe": ((encode, decode), pipe_cost)}
    packed = msgpack_codec()
    paths["msgpack_zmq"] = (packed, zmq_cost) if packed else (None, None)
    for name, (codec, transport) in paths.items():
        if codec is None:
            row[name] = {"missing": "pip install msgpack pyzmq (the dev extra has them)"}
            continue
        cost = codec_cost(messages, codec, args.repeats)
        wire = transport(codec[0](messages[-1]), args.messages)
        if wire is None:
            row[name] = {"missing": "pyzmq"}
            continue
        total = cost["encode_us"] + wire["latency_us"] + cost["decode_us"]
        row[name] = {**cost, **wire, "total_us": total,
                     "share_of_step": total / row["step_us"],
                     "bytes_per_token": cost["bytes"] / batch}
    print(f"batch {batch}: " + ", ".join(
        f"{k} {v['total_us']:.0f} us" for k, v in row.items() if isinstance(v, dict)
        and "total_us" in v) + f", step {row['step_us']:.0f} us", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"benchmark": "ipc_cost", "machine": machine_name("cpu"), "device": "cpu",
              "threads": torch.get_num_threads(), "messages": args.messages,
              "logprobs": args.logprobs,
              "results": [measure(b, args) for b in args.batch_sizes]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
