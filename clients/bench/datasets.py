"""Where the benchmark's prompts come from.

- `random`: seeded random words of a given length (in tokens, at `chars_per_token`
  characters each: 1 for loopserve's byte tokenizer, about 4 for BPE vocabularies), with an
  optional spread of lengths;
- `heldout`: the bundled model's held-out problems, read from the JSONL file shipped next
  to the checkpoint (`test_prompts.jsonl` in $LOOPSERVE_MODEL, as the image sets it, else
  in the repository's `models/loopserve-tiny/`);
- `jsonl`: any JSONL file.

A JSONL line is an object with `prompt` (text), `messages` (chat messages) or `question`
(text, sent as the prompt or as one user message), optionally `max_tokens` (or
`output_len`) and `answer` (the expected text: the report then counts exact matches).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import string
from pathlib import Path
from typing import Any

HELDOUT_FILE = "test_prompts.jsonl"
REPO_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "loopserve-tiny"
DATASETS = ("random", "heldout", "jsonl")


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    """One request to send: a prompt and/or chat messages, and its output length."""

    prompt: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    max_tokens: int | None = None
    answer: str | None = None

    def completion_prompt(self) -> str:
        if self.prompt is None:
            raise ValueError("this dataset has chat messages only; use --endpoint chat")
        return self.prompt

    def chat_messages(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def prompt_chars(self) -> int:
        if self.prompt is not None:
            return len(self.prompt)
        return sum(len(str(m.get("content") or "")) for m in self.messages or ())


def random_text(num_chars: int, rng: random.Random) -> str:
    """Lower-case words of 2-8 letters separated by spaces, exactly `num_chars` long."""
    words: list[str] = []
    length = 0
    while length < num_chars:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 8)))
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:num_chars].rstrip().ljust(num_chars, "x")


def random_requests(count: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    chars_per_token: float = 1.0, seed: int = 0) -> list[BenchRequest]:
    """`count` random prompts; lengths drawn uniformly within +-range_ratio of the given."""
    if input_len < 1 or output_len < 1:
        raise ValueError(f"random lengths must be >= 1, got input {input_len}, "
                         f"output {output_len}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)

    def length(mean: int) -> int:
        return max(1, rng.randint(round(mean * (1 - range_ratio)), round(mean * (1 + range_ratio))))

    return [BenchRequest(prompt=random_text(max(1, round(length(input_len) * chars_per_token)),
                                            rng), max_tokens=length(output_len))
            for _ in range(count)]


def parse_line(data: Any, default_max_tokens: int | None, where: str) -> BenchRequest:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    messages = data.get("messages")
    prompt = data.get("prompt", data.get("question"))
    if prompt is None and not messages:
        raise ValueError(f"{where}: needs a 'prompt', 'messages' or 'question' field")
    if messages is not None and not (isinstance(messages, list)
                                     and all(isinstance(m, dict) for m in messages)):
        raise ValueError(f"{where}: 'messages' must be a list of objects")
    max_tokens = data.get("max_tokens", data.get("output_len", default_max_tokens))
    return BenchRequest(prompt=None if prompt is None else str(prompt),
                        messages=None if messages is None else tuple(messages),
                        max_tokens=None if max_tokens is None else int(max_tokens),
                        answer=None if data.get("answer") is None else str(data["answer"]))


def jsonl_requests(path: str | Path, default_max_tokens: int | None = None
                   ) -> list[BenchRequest]:
    """Every request of a JSONL file, in file order (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    requests = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    data = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}:{number}: not JSON ({exc})") from exc
                requests.append(parse_line(data, default_max_tokens, f"{path}:{number}"))
    if not requests:
        raise ValueError(f"{path} holds no requests")
    return requests


def heldout_path() -> Path:
    return Path(os.environ.get("LOOPSERVE_MODEL") or REPO_MODEL_DIR) / HELDOUT_FILE


def heldout_requests(path: str | Path | None = None, default_max_tokens: int | None = None
                     ) -> list[BenchRequest]:
    """The bundled model's held-out problems (its shipped JSONL file)."""
    path = Path(path) if path else heldout_path()
    if not path.is_file():
        raise FileNotFoundError(f"the bundled model's held-out prompts are not at {path}; "
                                "pass --dataset jsonl --dataset-path FILE instead")
    return jsonl_requests(path, default_max_tokens)


def sample(pool: list[BenchRequest], count: int, seed: int = 0, shuffle: bool = True
           ) -> list[BenchRequest]:
    """`count` requests from `pool`: a seeded shuffle, cycled when the pool is smaller."""
    order = list(pool)
    if shuffle:
        random.Random(seed).shuffle(order)
    return [order[i % len(order)] for i in range(count)]
