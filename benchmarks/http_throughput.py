"""HTTP end-to-end throughput of `loopserve serve` against the engine's offline throughput on
the same requests, in one run.

At each concurrency c, the same greedy requests (distinct prompts, fixed output length) go
(1) through `LLM.generate` with at most c sequences per batch, and (2) over HTTP to a
`loopserve serve` subprocess from c concurrent clients (whole responses, then SSE streams).
The ratio http / offline is what the HTTP layer costs (best round over best round, and the
median of the rounds' own ratios: `paired_over_offline`); time is never asserted anywhere.
With an engine-core process, each HTTP level also reports the IPC cost from the server's
`loopserve_engine_core_{messages,bytes}_total` counters: messages per second and per token,
bytes per token (what crossed from the core while the level's requests ran). And it reports
where the CPU went while the requests ran: cores busy in the load-generating client (this
process), the API process and the engine-core process (from /proc, Linux), against the
machine's core count: on a small machine the three contend, which offline never does. The
load generator is aiohttp (as vLLM's serving benchmark): its C parser keeps the client's share
of a small machine's cores small (httpx cost about twice the CPU per token here).
Both sides also report their engine steps (from each step's `step_seconds`: offline through
the engine's stats callback, the server through `loopserve_engine_step_seconds`): how many
ran, their mean time, and the share of the wall time spent in them. Slower steps mean the
processes contend for the cores; a smaller share means time lost between steps (IPC,
the hand-off of each finished request to the next).

    python -m benchmarks.http_throughput                     # the bundled model, else a CPU model
    python -m benchmarks.http_throughput --model DIR --concurrency 1 8 32 64 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import random
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import torch

from engine import LLM, SamplingParams, load_model, save_model
from model.weights import BUNDLED_MODEL_DIR

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="checkpoint dir (default: the bundled model, else a random CPU "
                             "model of benchmarks.engine_throughput)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--repeats", type=int, default=2, help="best of this many rounds")
    parser.add_argument("--requests-per-client", type=int, default=2,
                        help="requests at concurrency c: max(8, this * c), at most --requests")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32, help="characters (byte tokens)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the offline engine and of the server (on a "
                             "shared or small CPU, more threads than free cores spin-wait)")
    parser.add_argument("--no-stream", action="store_true", help="skip the SSE measurement")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def checkpoint(args: argparse.Namespace, scratch: Path) -> tuple[Path, str]:
    """The model to serve and where it came from."""
    if args.model:
        return Path(args.model), "given"
    if (BUNDLED_MODEL_DIR / "config.json").is_file():
        return BUNDLED_MODEL_DIR, "bundled"
    from benchmarks.engine_throughput import build_model
    from benchmarks.engine_throughput import parse_args as engine_args

    model = build_model(engine_args(["--device", "cpu", "--dtype", "fp32"]))
    return save_model(model, scratch / "cpu-bench"), "random CPU model (no bundled model yet)"


def prompts(count: int, length: int, seed: int) -> list[str]:
    """Distinct prompts (distinct first characters too: nothing for the prefix cache)."""
    rng = random.Random(seed)
    letters = string.ascii_letters + string.digits
    return [letters[i % len(letters)] + "".join(rng.choice(letters) for _ in range(length - 1))
            for i in range(count)]


class Offline:
    """`LLM.generate` over the same requests, at most `max_num_seqs` sequences per batch."""

    def __init__(self, model_dir: Path, args: argparse.Namespace, max_num_seqs: int) -> None:
        self.llm = LLM(str(model_dir), device=args.device, dtype=args.dtype,
                       max_num_seqs=max_num_seqs)
        self.params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                     ignore_eos=True)
        self.llm.generate(["warm-up"], self.params)
        self.steps: list[float] = []  # step_seconds of the steps of the last run
        self.llm.engine.stats_callback = lambda stats: self.steps.append(stats.step_seconds)

    def throughput(self, texts: list[str]) -> tuple[float, dict]:
        """Tokens per second, and the engine's steps and the cores it kept busy."""
        self.steps.clear()
        start, cpu_start = time.perf_counter(), time.process_time()
        outputs = self.llm.generate(texts, self.params)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        tokens = sum(len(o.token_ids) for o in outputs)
        seen = {"cpu": {"engine_cores": round(cpu / seconds, 2),
                        "engine_cpu_us_per_token": round(1e6 * cpu / max(tokens, 1), 1)},
                "steps": step_summary(len(self.steps), sum(self.steps), seconds)}
        return tokens / seconds, seen


# ---------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process so far (None where /proc cannot say)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (the engine core of a server) from /proc, leaving out
    multiprocessing's resource tracker."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != pid:
                continue
            if b"resource_tracker" not in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
    return found


class CpuMeter:
    """Cores kept busy by the client (this process), the API process and its children."""

    def __init__(self, server_pid: int | None) -> None:
        self.pids = {"api": server_pid} if server_pid else {}
        if server_pid:
            self.pids.update({f"core_{i}" if i else "core": p
                              for i, p in enumerate(child_pids(server_pid))})

    def read(self) -> dict[str, float | None]:
        return {"client": time.process_time(),
                **{name: cpu_seconds(pid) for name, pid in self.pids.items()}}

    @staticmethod
    def cpu_per_token(before: dict, after: dict, tokens: int) -> dict[str, float]:
        """CPU microseconds each process spent per generated token: steadier than a
        throughput ratio on a noisy machine, and what a change to the HTTP path moves."""
        return {f"{name}_cpu_us_per_token": round(1e6 * (after[name] - before[name])
                                                  / max(tokens, 1), 1)
                for name in before if before[name] is not None and after.get(name) is not None}

    @staticmethod
    def cores(before: dict, after: dict, seconds: float) -> dict[str, float]:
        return {f"{name}_cores": round((after[name] - before[name]) / seconds, 2)
                for name in before if before[name] is not None and after.get(name) is not None}


@contextlib.contextmanager
def served(model_dir: Path, args: argparse.Namespace, max_num_seqs: int):
    port = free_port()
    command = [sys.executable, "-m", "loopserve_cli", "serve", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--device", args.device,
               "--dtype", args.dtype, "--max-num-seqs", str(max_num_seqs),
               "--max-queue", "4096", "--no-access-log", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(command, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("loopserve serve did not start")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(60)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


async def _one(http: aiohttp.ClientSession, body: dict, stream: bool,
               events: list[int] | None = None) -> int:
    """Completion tokens of one request (from usage: the final chunk when streaming); a
    stream's text events are added to `events[0]` (fewer than its tokens where the server
    merged the deltas of a lagging stream)."""
    if not stream:
        async with http.post("/v1/completions", json=body) as response:
            response.raise_for_status()
            return (await response.json())["usage"]["completion_tokens"]
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    tokens = chunks = 0
    async with http.post("/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            if b'"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            else:
                chunks += 1
    if events is not None:
        events[0] += chunks
    return tokens


SERVER_COUNTERS = {"tokens": "loopserve_generation_tokens_total{",
                   "messages": "loopserve_engine_core_messages_total{",
                   "bytes": "loopserve_engine_core_bytes_total{",
                   "steps": "loopserve_engine_step_seconds_count{",
                   "step_seconds": "loopserve_engine_step_seconds_sum{"}


async def _server_counters(http: aiohttp.ClientSession) -> dict[str, float]:
    """Tokens generated, the engine core's IPC counters (absent without a core process) and
    its step-time histogram's count and sum, so far."""
    async with http.get("/metrics") as response:
        text = await response.text()
    found = {}
    for line in text.splitlines():
        for name, prefix in SERVER_COUNTERS.items():
            if line.startswith(prefix):
                found[name] = float(line.rsplit(" ", 1)[1])
    return found


def step_summary(steps: float, seconds: float, wall: float) -> dict:
    """Engine steps run, their mean time, and the share of the wall time spent in them."""
    return {"steps": int(steps), "mean_step_ms": round(1e3 * seconds / max(steps, 1), 3),
            "step_share_of_wall": round(seconds / wall, 3)}


async def _clients(url: str, bodies: list[dict], concurrency: int, stream: bool,
                   meter: CpuMeter) -> tuple[float, dict]:
    """Tokens per second over the whole run, and what the server did meanwhile: the IPC
    cost, the engine's steps, the cores busy, and the steady window.

    The window runs from the start until the first client finds no request left: until
    then all `concurrency` clients keep one request in flight each. After it the run drains
    (fewer and fewer clients, smaller and smaller batches), which offline, whose requests
    are all queued at once, never does; the window's rate (from the server's token
    counter) is what a server under steady load at this concurrency delivers."""
    pending = list(reversed(bodies))
    window: dict = {}
    events = [0]  # a stream's text events, all clients together
    connector = aiohttp.TCPConnector(limit=concurrency + 1)  # + 1: the metrics scrapes
    async with aiohttp.ClientSession(url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as http:
        await _one(http, bodies[0], stream)  # warm-up (connection, first-request paths)

        async def worker() -> int:
            tokens = 0
            while pending:
                tokens += await _one(http, pending.pop(), stream, events)
            if not window:  # the first client out of work: the steady window ends
                window["at"] = time.perf_counter()  # before the await: only one sets it
                window["counters"] = await _server_counters(http)
            return tokens

        before, cpu_before = await _server_counters(http), meter.read()
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(worker() for _ in range(concurrency))))
        seconds = time.perf_counter() - start
        cpu_after = meter.read()
        cpu = {**CpuMeter.cores(cpu_before, cpu_after, seconds),
               **CpuMeter.cpu_per_token(cpu_before, cpu_after, tokens)}
        after = await _server_counters(http)
    seen: dict = {"cpu": cpu, **_server_side(before, after, seconds, tokens)}
    if stream:
        seen["stream_events_per_token"] = round(events[0] / max(tokens, 1), 4)
    steady = _server_side(before, window["counters"], window["at"] - start, tokens)
    if "tokens" in steady:
        seen["steady_window"] = {
            "seconds": round(window["at"] - start, 3),
            "tokens_per_s": round(steady.pop("tokens") / (window["at"] - start), 1),
            **{k: v for k, v in steady.items() if k == "steps"}}
    seen.pop("tokens", None)
    return tokens / seconds, seen


def _server_side(before: dict, after: dict, seconds: float, tokens: int) -> dict:
    """The counters' differences over `seconds`: tokens, steps and the IPC cost."""
    diff = {name: after[name] - before[name] for name in after if name in before}
    seen: dict = {}
    if "tokens" in diff:
        seen["tokens"] = diff["tokens"]
    if "steps" in diff:
        seen["steps"] = step_summary(diff["steps"], diff["step_seconds"], seconds)
    if "messages" in diff:
        seen["ipc"] = {"messages_per_s": round(diff["messages"] / seconds, 1),
                       "messages_per_token": round(diff["messages"] / max(tokens, 1), 3),
                       "bytes_per_token": round(diff["bytes"] / max(tokens, 1), 1)}
    return seen


def http_throughput(url: str, args: argparse.Namespace, texts: list[str], concurrency: int,
                    stream: bool, meter: CpuMeter) -> tuple[float, dict]:
    bodies = [{"prompt": t, "max_tokens": args.max_tokens, "temperature": 0.0,
               "ignore_eos": True} for t in texts]
    return asyncio.run(_clients(url, bodies, concurrency, stream, meter))


# ---------------------------------------------------------------------- the run
def describe(model_dir: Path, source: str) -> dict:
    cfg = load_model(model_dir).config
    return {"source": source, "dir": str(model_dir), "d_model": cfg.d_model,
            "n_layers": cfg.n_layers, "max_loops": cfg.max_loops, "vocab_size": cfg.vocab_size,
            "memory_slots": [cfg.local_memory_slots, cfg.global_memory_slots]}


def measure_level(model_dir: Path, url: str, args: argparse.Namespace, texts: list[str],
                  concurrency: int, meter: CpuMeter) -> dict:
    """Best of `--repeats` rounds; each round runs offline, HTTP and SSE back to back, so a
    burst of load from elsewhere on a shared machine hits all variants alike."""
    count = min(args.requests, max(8, args.requests_per_client * concurrency))
    subset = texts[:count]
    offline = Offline(model_dir, args, concurrency)
    runs: dict[str, list[float]] = {"offline": [], "http": [], "stream": []}
    seen: dict[str, list[dict]] = {"offline": [], "http": [], "stream": []}
    for _ in range(args.repeats):
        rate, round_seen = offline.throughput(subset)
        runs["offline"].append(rate)
        seen["offline"].append(round_seen)
        for name, stream in (("http", False), ("stream", True)):
            if stream and args.no_stream:
                continue
            rate, round_seen = http_throughput(url, args, subset, concurrency, stream, meter)
            runs[name].append(rate)
            seen[name].append(round_seen)
    best = {name: max(values) for name, values in runs.items() if values}
    level = {"concurrency": concurrency, "requests": count,
             "offline_tokens_per_s": round(best["offline"], 1),
             "http_tokens_per_s": round(best["http"], 1),
             "http_over_offline": round(best["http"] / best["offline"], 3)}
    if "stream" in best:
        level.update(http_stream_tokens_per_s=round(best["stream"], 1),
                     stream_over_offline=round(best["stream"] / best["offline"], 3))
    for name in ("http", "stream"):  # the steady window's rate, best round
        rates = [r["steady_window"]["tokens_per_s"] for r in seen[name] if "steady_window" in r]
        if rates:
            level[f"{name}_steady_over_offline"] = round(max(rates) / best["offline"], 3)
    level["runs_tokens_per_s"] = {k: [round(v, 1) for v in vs] for k, vs in runs.items() if vs}
    level["paired_over_offline"] = paired_ratios(runs)
    # of the round whose throughput is reported: cores busy, engine steps, IPC cost
    level["best_round"] = {name: seen[name][values.index(best[name])]
                           for name, values in runs.items() if values}
    print(json.dumps(level), file=sys.stderr)
    return level


def paired_ratios(runs: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Each round's HTTP (and SSE) rate over the same round's offline rate: the median,
    lowest and highest. The rounds interleave offline, HTTP and SSE, so a pair shares the
    machine's state; the ratio of two best rounds can pair a fast moment with a slow one
    (a shared machine's speed moved 30-50% within one run on 2026-12-03)."""
    found = {}
    for name in ("http", "stream"):
        ratios = [r / o for r, o in zip(runs.get(name, []), runs["offline"], strict=False)]
        if ratios:
            found[name] = {"median": round(statistics.median(ratios), 3),
                           "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
    return found


def server_stack() -> dict[str, str]:
    """The event loop and HTTP parser uvicorn picks here ("auto": the fast ones if present)."""
    found = importlib.util.find_spec
    return {"loop": "uvloop" if found("uvloop") else "asyncio",
            "http": "httptools" if found("httptools") else "h11", "client": "aiohttp"}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir, source = checkpoint(args, Path(scratch))
        texts = prompts(args.requests, args.prompt_len, args.seed)
        with served(model_dir, args, max(args.concurrency)) as (url, pid):
            meter = CpuMeter(pid)
            levels = [measure_level(model_dir, url, args, texts, c, meter)
                      for c in args.concurrency]
        result = {"benchmark": "http_throughput",
                  "machine": platform.processor() or platform.machine(),
                  "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                  "device": args.device, "model": describe(model_dir, source),
                  "server_stack": server_stack(),
                  "prompt_chars": args.prompt_len, "max_tokens": args.max_tokens,
                  "greedy": True, "repeats": args.repeats, "levels": levels}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
