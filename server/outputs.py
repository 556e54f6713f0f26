"""Shared by both generation routes: running a generation as a whole JSON response or as
an SSE stream, accumulating choices, `usage` with the request's compute (DESIGN section 6),
logprobs in OpenAI's two formats, and the request's access-log fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.request import CompletionOutput, TokenLogprob
from model.tokenizer import Tokenizer
from server.errors import APIError
from server.generation import Generation, run_until_disconnect
from server.sse import DONE, SSEResponse, sse_event


@dataclasses.dataclass
class Choice:
    """One choice, accumulated over its deltas (non-streaming responses)."""

    texts: list[str] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, piece: CompletionOutput) -> None:
        if piece.text:
            self.texts.append(piece.text)
        if piece.logprobs:
            self.logprobs.extend(piece.logprobs)
        if piece.finish_reason is not None:
            self.finish_reason, self.stop_reason = piece.finish_reason, piece.stop_reason

    @property
    def text(self) -> str:
        return "".join(self.texts)


async def collect(gen: Generation, n: int) -> list[Choice]:
    """Start `gen`, then every choice of every prompt in OpenAI's order (prompt-major);
    closes `gen`."""
    choices = [Choice() for _ in range(len(gen.prompts) * n)]
    try:
        await gen.start()
        async for i, delta in gen.deltas():
            for piece in delta.outputs:
                choices[i * n + piece.index].add(piece)
    finally:
        await gen.close()
    return choices


class ResponseFormat(Protocol):
    """How a route shapes its chunks and its whole response (see routes_*.py)."""

    n: int
    head: dict[str, Any]

    def chunk(self, prompt_index: int, piece: CompletionOutput, first: bool
              ) -> dict[str, Any] | None: ...

    def response(self, choices: list[Choice]) -> dict[str, Any]: ...


async def respond(gen: Generation, fmt: ResponseFormat, stream: bool, include_usage: bool,
                  request: Request) -> Response:
    """Run `gen` as an SSE stream or a whole JSON response; a client that leaves aborts it.
    A stream starts only once every prompt was admitted, so admission errors keep their
    status code."""
    log = request.scope["state"].setdefault("log", {})
    if stream:
        await run_until_disconnect(gen.start(), request)
        return SSEResponse(stream_events(gen, fmt, include_usage, log))
    choices = await run_until_disconnect(collect(gen, fmt.n), request)
    result = fmt.response(choices)
    log.update(log_fields(fmt.head["id"], result["usage"], [c.finish_reason for c in choices]))
    return JSONResponse(result)


async def stream_events(gen: Generation, fmt: ResponseFormat, include_usage: bool,
                        log: dict[str, Any]) -> AsyncGenerator[str, None]:
    """SSE events of a started generation: one per choice delta, the usage chunk when asked,
    an error event if it fails midway, then [DONE]. Closing it aborts what is unfinished."""
    started: set[int] = set()
    reasons: list[str | None] = []
    try:
        try:
            async for i, delta in gen.deltas():
                for piece in delta.outputs:
                    key = i * fmt.n + piece.index
                    chunk = fmt.chunk(i, piece, key not in started)
                    started.add(key)
                    if piece.finish_reason is not None:
                        reasons.append(piece.finish_reason)
                    if chunk is not None:
                        yield sse_event(chunk)
            usage_ = usage(gen)
            log.update(log_fields(fmt.head["id"], usage_, reasons))
            if include_usage:
                yield sse_event({**fmt.head, "choices": [], "usage": usage_})
        except APIError as exc:
            log["error"] = exc.message
            yield sse_event(exc.body())
        yield DONE
    finally:
        await gen.close()


# ---------------------------------------------------------------------- usage
def usage(gen: Generation) -> dict[str, Any]:
    """Token counts and the compute of all the request's prompts, merged."""
    prompt_tokens = sum(len(p) for p in gen.prompts)
    completion = [sum(t for _, t in o.finished_choices.values()) for o in gen.observers]
    computes = [f.compute for f in gen.finals if f is not None and f.compute]
    weights = [len(f.prompt_token_ids) - f.num_cached_tokens + c
               for f, c in zip(gen.finals, completion, strict=True) if f is not None and f.compute]
    result: dict[str, Any] = {"prompt_tokens": prompt_tokens,
                              "completion_tokens": sum(completion),
                              "total_tokens": prompt_tokens + sum(completion)}
    if computes:
        result["compute"] = merge_compute(computes, weights)
    return result


def merge_compute(computes: list[dict], weights: list[int]) -> dict[str, Any]:
    """One prompt: its compute as is. Several: FLOPs summed, per-token means weighted by each
    prompt's computed tokens (prompt minus cached, plus generated; an approximation)."""
    if len(computes) == 1:
        return computes[0]
    total = sum(weights) or 1

    def mean(key: str) -> list[float]:
        layers = len(computes[0][key])
        return [sum(c[key][i] * w for c, w in zip(computes, weights, strict=True)) / total
                for i in range(layers)]

    flops = sum(c["flops"] for c in computes)
    flops_max = sum(c["flops_max_depth"] for c in computes)
    loops = mean("loops_per_layer")
    return {"max_loops": max(c["max_loops"] for c in computes),
            "mean_loops_per_token": sum(loops) / len(loops), "loops_per_layer": loops,
            "memory_gate_per_layer": mean("memory_gate_per_layer"), "flops": flops,
            "flops_max_depth": flops_max,
            "compute_saved": 1.0 - flops / flops_max if flops_max else 0.0}


def log_fields(response_id: str, usage_: dict[str, Any], reasons: list[str | None]
               ) -> dict[str, Any]:
    """What the access log says about a finished generation."""
    compute = usage_.get("compute") or {}
    return {"response_id": response_id, "prompt_tokens": usage_["prompt_tokens"],
            "completion_tokens": usage_["completion_tokens"],
            "mean_loops_per_token": compute.get("mean_loops_per_token"),
            "compute_saved": compute.get("compute_saved"), "flops": compute.get("flops"),
            "finish_reasons": reasons}


# ---------------------------------------------------------------------- logprobs
LOGPROB_FLOOR = -9999.0  # JSON has no -inf (a token filtered out by top_k / top_p)


def _finite(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN also fails >=


def _token_bytes(tokenizer: Tokenizer, token_id: int) -> list[int]:
    raw = getattr(tokenizer, "token_bytes", None)
    data = raw(token_id) if raw is not None else tokenizer.token_text(token_id).encode()
    return list(data)


def completion_logprobs(tokenizer: Tokenizer, items: list[TokenLogprob], offset: int
                        ) -> tuple[dict[str, Any], int]:
    """The legacy completions format; `offset` is the text offset of the first token."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for item in items:
        text = tokenizer.token_text(item.token_id)
        tokens.append(text)
        token_logprobs.append(_finite(item.logprob))
        top.append({tokenizer.token_text(t): _finite(lp) for t, lp in item.top_logprobs})
        offsets.append(offset)
        offset += len(text)
    return ({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
             "text_offset": offsets}, offset)


def chat_logprobs(tokenizer: Tokenizer, items: list[TokenLogprob]) -> dict[str, Any]:
    """The chat format: one entry per token with its top alternatives."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": tokenizer.token_text(token_id), "logprob": _finite(logprob),
                "bytes": _token_bytes(tokenizer, token_id)}

    return {"content": [{**entry(item.token_id, item.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in item.top_logprobs]}
                        for item in items]}
