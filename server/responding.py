"""Running a generation for both generation routes: as a whole JSON response (`collect`
accumulates each choice) or as an SSE stream (`stream_events`), with the request's
access-log fields. How a route shapes its bodies and chunks is its `ResponseFormat`
(routes_*.py); what goes into them besides text is server/formatting.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.request import CompletionOutput, TokenLogprob
from server.errors import APIError
from server.formatting import log_fields, usage
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
            usage_ = usage(gen.tallies)
            log.update(log_fields(fmt.head["id"], usage_, reasons))
            if include_usage:
                yield sse_event({**fmt.head, "choices": [], "usage": usage_})
        except APIError as exc:
            log["error"] = exc.message
            yield sse_event(exc.body())
        yield DONE
    finally:
        await gen.close()
