"""What one engine-core message costs: pickle over a multiprocessing pipe (what loopserve
ships) against msgpack over ZMQ (what vLLM v1 uses), on the core's real messages.

The bundled model serves B greedy requests offline (the core's own `LLMEngine`, no
detokenizer); after the prompts, each decode step's outputs become the `OutputBatch` the core
would send (prompt ids left out, step statistics and status included). For each B:

- codec: encode and decode time (best of repeats) and bytes of that batch, by pickle
  (`core_messages.encode/decode`) and by msgpack with a dataclass extension type (the typed
  objects come back, as the API process needs them);
- transport: one-way time per message of those bytes from a child process, through a
  `multiprocessing` pipe and through a ZMQ PUSH/PULL pair over `ipc://`;
- the engine step's own time, and each path's whole per-message cost as a share of it.

    python -m benchmarks.ipc_cost                 # B = 1, 8, 32, 64
    python -m benchmarks.ipc_cost --batch-sizes 64 --messages 2000

msgpack and pyzmq are dev dependencies; without them that path is reported as missing.
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
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- real messages
def decode_batches(batch: int, steps: int = 4) -> tuple[list[OutputBatch], float]:
    """The `OutputBatch` of `steps` decode steps with `batch` requests, and the best step
    time (seconds) among them."""
    llm = LLMEngine.from_pretrained(None, EngineConfig(), detokenize=False)
    kept: list[StepStats] = []
    llm.stats_callback = kept.append
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
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
        batches.append(OutputBatch(tuple(outputs), kept[-1], status))
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
        return DATACLASSES[code](*msgpack.unpackb(data, ext_hook=ext_hook))

    return (lambda m: msgpack.packb(m, default=default),
            lambda b: msgpack.unpackb(b, ext_hook=ext_hook))


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
def _pipe_sender(conn, payload: bytes, count: int) -> None:
    for _ in range(count):
        conn.send_bytes(payload)
    conn.close()


def pipe_us(payload: bytes, count: int) -> float:
    """One-way microseconds per message through a multiprocessing pipe."""
    receiver, sender = mp.Pipe(duplex=False)
    child = mp.Process(target=_pipe_sender, args=(sender, payload, count))
    child.start()
    receiver.recv_bytes()  # the child is up; time the rest
    start = time.perf_counter()
    for _ in range(count - 1):
        receiver.recv_bytes()
    elapsed = time.perf_counter() - start
    child.join()
    return elapsed / (count - 1) * 1e6


def _zmq_sender(address: str, payload: bytes, count: int) -> None:
    import zmq
    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.connect(address)
    for _ in range(count):
        socket.send(payload, copy=False)
    socket.close(linger=-1)
    context.term()


def zmq_us(payload: bytes, count: int) -> float | None:
    """One-way microseconds per message through ZMQ PUSH/PULL over ipc://, or None."""
    try:
        import zmq
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        address = f"ipc://{Path(tmp) / 'core.sock'}"
        context = zmq.Context()
        socket = context.socket(zmq.PULL)
        socket.bind(address)
        child = mp.Process(target=_zmq_sender, args=(address, payload, count))
        child.start()
        socket.recv(copy=False)
        start = time.perf_counter()
        for _ in range(count - 1):
            socket.recv(copy=False)
        elapsed = time.perf_counter() - start
        child.join()
        socket.close()
        context.term()
    return elapsed / (count - 1) * 1e6


# ---------------------------------------------------------------------- the run
def measure(batch: int, args: argparse.Namespace) -> dict[str, Any]:
    messages, step_s = decode_batches(batch)
    row: dict[str, Any] = {"batch": batch, "step_us": step_s * 1e6}
    paths = {"pickle_pipe": ((encode, decode), pipe_us)}
    packed = msgpack_codec()
    paths["msgpack_zmq"] = (packed, zmq_us) if packed else (None, None)
    for name, (codec, transport) in paths.items():
        if codec is None:
            row[name] = {"missing": "pip install msgpack pyzmq (the dev extra has them)"}
            continue
        cost = codec_cost(messages, codec, args.repeats)
        wire = transport(codec[0](messages[-1]), args.messages)
        if wire is None:
            row[name] = {"missing": "pyzmq"}
            continue
        total = cost["encode_us"] + wire + cost["decode_us"]
        row[name] = {**cost, "transport_us": wire, "total_us": total,
                     "share_of_step": total / row["step_us"],
                     "bytes_per_token": cost["bytes"] / batch}
    print(f"batch {batch}: " + ", ".join(
        f"{k} {v['total_us']:.0f} us" for k, v in row.items() if isinstance(v, dict)
        and "total_us" in v) + f", step {row['step_us']:.0f} us", file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"benchmark": "ipc_cost", "machine": machine_name("cpu"),
              "threads": torch.get_num_threads(), "messages": args.messages,
              "results": [measure(b, args) for b in args.batch_sizes]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
