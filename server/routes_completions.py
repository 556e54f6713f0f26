"""POST /v1/completions: one or several prompts (text or token ids), n choices each, echo,
logprobs, streaming as SSE with an optional final usage chunk."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.request import CompletionOutput
from model.tokenizer import Tokenizer
from server.generation import Generation
from server.outputs import completion_logprobs, respond, usage
from server.params import check_model, completion_inputs, prompt_list
from server.schemas import CompletionRequest, CompletionResponse
from server.state import ServerState, server_state

router = APIRouter()


class CompletionFormat:
    """Builds completion bodies and chunks; keeps each choice's echo and text offset."""

    def __init__(self, state: ServerState, body: CompletionRequest, gen: Generation,
                 response_id: str) -> None:
        self.gen = gen
        self.tokenizer = state.processor.tokenizer
        self.n = body.n
        self.want_logprobs = body.logprobs is not None
        self.head = {"id": response_id, "object": "text_completion",
                     "created": int(time.time()), "model": state.model_name}
        self.echoes = _echo_texts(body, self.tokenizer) if body.echo else None
        self.offsets = [len(e) for e in self.echoes] if self.echoes else None
        self.usage_null = bool(body.stream_options and body.stream_options.include_usage)

    def _echo(self, index: int) -> str:
        return self.echoes[index // self.n] if self.echoes else ""

    def _logprobs(self, index: int, items: list) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        offset = self.offsets[index] if self.offsets else 0
        result, end = completion_logprobs(self.tokenizer, items or [], offset)
        if self.offsets is None:
            self.offsets = [0] * (len(self.gen.prompts) * self.n)
        self.offsets[index] = end
        return result

    def chunk(self, prompt_index: int, piece: CompletionOutput, first: bool
              ) -> dict[str, Any] | None:
        index = prompt_index * self.n + piece.index
        text = (self._echo(index) if first else "") + piece.text
        if not text and piece.finish_reason is None and not piece.logprobs:
            return None
        choice = {"index": index, "text": text,
                  "logprobs": self._logprobs(index, piece.logprobs),
                  "finish_reason": piece.finish_reason, "stop_reason": piece.stop_reason}
        chunk = {**self.head, "choices": [choice]}
        if self.usage_null:
            chunk["usage"] = None
        return chunk

    def response(self, choices: list) -> dict[str, Any]:
        body = [{"index": i, "text": self._echo(i) + c.text,
                 "logprobs": self._logprobs(i, c.logprobs),
                 "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                for i, c in enumerate(choices)]
        return {**self.head, "choices": body, "usage": usage(self.gen)}


def _echo_texts(body: CompletionRequest, tokenizer: Tokenizer) -> list[str]:
    """The prompts as text: a text prompt as sent, token ids decoded."""
    return [p if isinstance(p, str) else tokenizer.decode(p) for p in prompt_list(body.prompt)]


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = server_state(request)
    with state.counting_invalid():
        check_model(body.model, state.model_name)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        prepared = completion_inputs(body, state.processor, state.settings.max_prompts,
                                     response_id)
    gen = state.generation(request, prepared)
    fmt = CompletionFormat(state, body, gen, response_id)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(gen, fmt, body.stream, include_usage, request)

