"""Bits per byte of held-out text through the server, in exact and adaptive semantics, next
to the loops each spent: the paper's measure, as any client can take it.

The text is the bundled model's held-out problems (models/loopserve-tiny/test_prompts.jsonl):
each problem's prompt followed by its answer ("44 + 69=113", "Q: ...?\\nA: Dilton"). Every
text is tokenized by the server (/tokenize, with <bos>) and scored with one echo request
(`echo`, `logprobs: 0`, `max_tokens: 0`: the prompt's own logprobs, OpenAI's layout); bits
per byte is -sum(log2 p(token | tokens before)) over the text's tokens, divided by its UTF-8
bytes, for the whole text and for the answer alone. Exact semantics is `halt_threshold: 0`
(no token halts early); adaptive is the model's default threshold (or --threshold). The
loops come from each response's `usage.compute`.

    python -m benchmarks.bits_per_byte                       # starts `loopserve serve` itself
    python -m benchmarks.bits_per_byte --url http://localhost:8000 --limit 50
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from benchmarks.http_throughput import served
from model.weights import BUNDLED_MODEL_DIR

HELD_OUT = BUNDLED_MODEL_DIR / "test_prompts.jsonl"
ARITHMETIC = ("add", "sub", "mul", "expr")
BATCH = 32  # prompts per request (the server takes up to --max-prompts, 64 by default)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running server (default: start one)")
    parser.add_argument("--model", default=str(BUNDLED_MODEL_DIR),
                        help="checkpoint to serve when no --url is given")
    parser.add_argument("--data", default=str(HELD_OUT), help="JSONL with prompt and answer")
    parser.add_argument("--limit", type=int, default=None,
                        help="the first N problems of each group (arithmetic, fact) only")
    parser.add_argument("--threshold", type=float, default=None,
                        help="adaptive semantics' halt_threshold (default: the model's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="the started server's threads")
    return parser.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class Text:
    """One held-out problem as token ids; the answer is the tail after `prompt_tokens`."""

    group: str  # "arithmetic" or "fact"
    ids: list[int]
    prompt_tokens: int
    text_bytes: int  # UTF-8 bytes of prompt + answer
    answer_bytes: int


@dataclasses.dataclass
class Tally:
    """Summed bits and bytes of one group in one semantics."""

    text_bits: float = 0.0
    text_bytes: int = 0
    answer_bits: float = 0.0
    answer_bytes: int = 0
    texts: int = 0

    def add(self, text: Text, logprobs: list[float | None]) -> None:
        nats = [-lp for lp in logprobs[1:]]  # entry 0 (<bos>) has no logprob
        self.text_bits += sum(nats) / math.log(2)
        self.answer_bits += sum(nats[text.prompt_tokens - 1:]) / math.log(2)
        self.text_bytes += text.text_bytes
        self.answer_bytes += text.answer_bytes
        self.texts += 1

    def merge(self, other: Tally) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def report(self) -> dict:
        return {"text_bits_per_byte": round(self.text_bits / max(self.text_bytes, 1), 4),
                "answer_bits_per_byte": round(self.answer_bits / max(self.answer_bytes, 1), 4),
                "text_bytes": self.text_bytes, "answer_bytes": self.answer_bytes,
                "texts": self.texts}


@dataclasses.dataclass
class Compute:
    """The loops and FLOPs the scoring requests spent (raw sums, merged exactly)."""

    tokens: int = 0
    loop_sum: float = 0.0  # mean loops per token x tokens, summed over requests
    flops: int = 0
    flops_max_depth: int = 0

    def add(self, usage: dict) -> None:
        compute = usage["compute"]
        computed = usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
        self.tokens += computed
        self.loop_sum += compute["mean_loops_per_token"] * computed
        self.flops += compute["flops"]
        self.flops_max_depth += compute["flops_max_depth"]

    def report(self) -> dict:
        return {"mean_loops_per_token": round(self.loop_sum / max(self.tokens, 1), 4),
                "flops": self.flops,
                "compute_saved": round(1 - self.flops / self.flops_max_depth, 4)
                if self.flops_max_depth else 0.0, "scored_tokens": self.tokens}


def group_of(row: dict) -> str:
    return "arithmetic" if row["task"] in ARITHMETIC else row["task"]


def held_out_texts(path: Path, limit: int | None) -> list[tuple[str, str, str]]:
    """(group, prompt, answer) of each problem, the first `limit` of each group if given;
    an answer as the plain format continues its prompt ("Q: ...\nA: Name")."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    taken: dict[str, int] = {}
    texts = []
    for row in rows:
        group = group_of(row)
        if limit is not None and taken.get(group, 0) >= limit:
            continue
        taken[group] = taken.get(group, 0) + 1
        answer = (" " if row["task"] == "fact" else "") + row["answer"]
        texts.append((group, row["prompt"], answer))
    return texts


def load_texts(http: httpx.Client, path: Path, limit: int | None) -> list[Text]:
    texts = []
    for group, prompt, answer in held_out_texts(path, limit):
        ids = tokenize(http, prompt + answer)
        prompt_tokens = len(tokenize(http, prompt))
        texts.append(Text(group, ids, prompt_tokens, len((prompt + answer).encode()),
                          len(answer.encode())))
    return texts


def tokenize(http: httpx.Client, text: str) -> list[int]:
    response = http.post("/tokenize", json={"prompt": text})
    response.raise_for_status()
    return response.json()["tokens"]


def batches(texts: list[Text]) -> Iterator[list[Text]]:
    for start in range(0, len(texts), BATCH):
        yield texts[start:start + BATCH]


def score(http: httpx.Client, texts: list[Text], threshold: float | None
          ) -> tuple[dict[str, Tally], Compute]:
    """Bits per group and the compute of scoring every text at `threshold`."""
    tallies: dict[str, Tally] = {}
    compute = Compute()
    for batch in batches(texts):
        body = {"prompt": [t.ids for t in batch], "echo": True, "logprobs": 0,
                "max_tokens": 0}
        if threshold is not None:
            body["halt_threshold"] = threshold
        response = http.post("/v1/completions", json=body)
        response.raise_for_status()
        result = response.json()
        for text, choice in zip(batch, result["choices"], strict=True):
            tallies.setdefault(text.group, Tally()).add(
                text, choice["logprobs"]["token_logprobs"])
        compute.add(result["usage"])
    return tallies, compute


def semantics_report(tallies: dict[str, Tally], compute: Compute) -> dict:
    total = Tally()
    for tally in tallies.values():
        total.merge(tally)
    return {**{group: tally.report() for group, tally in sorted(tallies.items())},
            "all": total.report(), **compute.report()}


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[str]:
    if args.url:
        yield args.url.rstrip("/")
        return
    with served(Path(args.model), args, max_num_seqs=BATCH) as url:
        yield url


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    with server(args) as url, httpx.Client(base_url=url, timeout=600) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        texts = load_texts(http, Path(args.data), args.limit)
        variants = {"exact": 0.0, "adaptive": args.threshold}
        report = {name: semantics_report(*score(http, texts, threshold))
                  for name, threshold in variants.items()}
    for name, values in report.items():
        print(f"{name}: {values['all']['text_bits_per_byte']} bits/byte (answers "
              f"{values['all']['answer_bits_per_byte']}), {values['mean_loops_per_token']} "
              f"loops/token", file=sys.stderr)
    result = {"benchmark": "bits_per_byte", "model": model, "data": args.data,
              "adaptive_threshold": args.threshold if args.threshold is not None
              else "model default", **report,
              "seconds": round(time.perf_counter() - started, 2)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
