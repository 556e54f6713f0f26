"""Typed results of the HTTP API: completions, stream chunks, usage and per-request compute.

One `Completion` type serves /v1/completions and /v1/chat/completions (`text` is the
choice's text or its message content), and one `Chunk` type serves both streams (`text` is
the delta's text or content). Fields a server does not send are None, so the same types
read any OpenAI-compatible server; `raw` keeps the whole JSON object.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Compute:
    """What one request spent (loopserve's `usage.compute`)."""

    max_loops: int
    mean_loops_per_token: float
    loops_per_layer: tuple[float, ...]
    memory_gate_per_layer: tuple[float, ...]
    flops: int
    flops_max_depth: int
    compute_saved: float  # 1 - flops / flops_max_depth

    @classmethod
    def from_json(cls, data: Any) -> Compute | None:
        if not isinstance(data, dict):
            return None
        return cls(max_loops=int(data.get("max_loops", 0)),
                   mean_loops_per_token=float(data.get("mean_loops_per_token", 0.0)),
                   loops_per_layer=tuple(float(x) for x in data.get("loops_per_layer", ())),
                   memory_gate_per_layer=tuple(
                       float(x) for x in data.get("memory_gate_per_layer", ())),
                   flops=int(data.get("flops", 0)),
                   flops_max_depth=int(data.get("flops_max_depth", 0)),
                   compute_saved=float(data.get("compute_saved", 0.0)))


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    compute: Compute | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache, when reported

    @classmethod
    def from_json(cls, data: Any) -> Usage | None:
        if not isinstance(data, dict):
            return None
        prompt, completion = int(data.get("prompt_tokens") or 0), int(
            data.get("completion_tokens") or 0)
        details = data.get("prompt_tokens_details") or {}
        return cls(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=int(data.get("total_tokens") or prompt + completion),
                   compute=Compute.from_json(data.get("compute")),
                   cached_tokens=int(details.get("cached_tokens") or 0))


def _choice_text(choice: dict[str, Any], key: str) -> str:
    """A completion choice's `text`, or the `content` of a chat choice's message/delta."""
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get(key) or {}).get("content") or ""


@dataclasses.dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: Any = None

    @classmethod
    def from_json(cls, data: dict[str, Any], key: str = "message") -> Choice:
        return cls(index=int(data.get("index", 0)), text=_choice_text(data, key),
                   finish_reason=data.get("finish_reason"), logprobs=data.get("logprobs"))


@dataclasses.dataclass(frozen=True)
class Completion:
    """A whole (non-streamed) response of either endpoint."""

    id: str
    model: str
    choices: tuple[Choice, ...]
    usage: Usage | None
    request_id: str | None = None  # the X-Request-Id header
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None

    @property
    def compute(self) -> Compute | None:
        return self.usage.compute if self.usage else None

    @classmethod
    def from_json(cls, data: dict[str, Any], request_id: str | None = None) -> Completion:
        choices = tuple(Choice.from_json(c, "message") for c in data.get("choices") or ())
        return cls(id=str(data.get("id", "")), model=str(data.get("model", "")),
                   choices=choices, usage=Usage.from_json(data.get("usage")),
                   request_id=request_id, raw=data)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One SSE event of a stream: text deltas, and `usage` on the final usage chunk."""

    id: str
    model: str
    choices: tuple[Choice, ...]
    usage: Usage | None
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def text(self) -> str:
        """The delta of choice 0 (streams with n > 1 interleave choices: see `choices`)."""
        return next((c.text for c in self.choices if c.index == 0), "")

    @property
    def finish_reason(self) -> str | None:
        return next((c.finish_reason for c in self.choices if c.index == 0), None)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Chunk:
        choices = tuple(Choice.from_json(c, "delta") for c in data.get("choices") or ())
        return cls(id=str(data.get("id", "")), model=str(data.get("model", "")),
                   choices=choices, usage=Usage.from_json(data.get("usage")), raw=data)


@dataclasses.dataclass(frozen=True)
class Model:
    """An entry of GET /v1/models (loopserve adds max_model_len, max_loops, n_layers)."""

    id: str
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def max_loops(self) -> int | None:
        return self.raw.get("max_loops")

    @property
    def n_layers(self) -> int | None:
        return self.raw.get("n_layers")
