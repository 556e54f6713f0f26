"""POST /v1/chat/completions: the tokenizer's chat template, n choices, logprobs with
top_logprobs, streaming as SSE (role first, then content deltas) with an optional usage chunk."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.request import CompletionOutput
from server.generation import Generation
from server.outputs import Choice, chat_logprobs, respond, usage
from server.params import chat_inputs, check_model
from server.schemas import ChatCompletionRequest, ChatCompletionResponse
from server.state import ServerState, server_state

router = APIRouter()


class ChatFormat:
    """Builds chat completion bodies and chunks."""

    def __init__(self, state: ServerState, body: ChatCompletionRequest, gen: Generation,
                 response_id: str) -> None:
        self.gen = gen
        self.n = body.n
        self.tokenizer = state.processor.tokenizer
        self.want_logprobs = body.logprobs
        self.created = int(time.time())
        self.head = {"id": response_id, "object": "chat.completion.chunk",
                     "created": self.created, "model": state.model_name}
        self.usage_null = bool(body.stream_options and body.stream_options.include_usage)

    def _logprobs(self, items: list | None) -> dict[str, Any] | None:
        return chat_logprobs(self.tokenizer, items or []) if self.want_logprobs else None

    def chunk(self, prompt_index: int, piece: CompletionOutput, first: bool
              ) -> dict[str, Any] | None:
        if not first and not piece.text and piece.finish_reason is None and not piece.logprobs:
            return None
        delta: dict[str, Any] = {"role": "assistant", "content": piece.text} if first else (
            {"content": piece.text} if piece.text else {})
        choice = {"index": piece.index, "delta": delta,
                  "logprobs": self._logprobs(piece.logprobs),
                  "finish_reason": piece.finish_reason, "stop_reason": piece.stop_reason}
        chunk = {**self.head, "choices": [choice]}
        if self.usage_null:
            chunk["usage"] = None
        return chunk

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        body = [{"index": i, "message": {"role": "assistant", "content": c.text},
                 "logprobs": self._logprobs(c.logprobs), "finish_reason": c.finish_reason,
                 "stop_reason": c.stop_reason} for i, c in enumerate(choices)]
        return {**self.head, "object": "chat.completion", "choices": body,
                "usage": usage(self.gen)}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = server_state(request)
    with state.counting_invalid():
        check_model(body.model, state.model_name)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        prepared = chat_inputs(body, state.processor, response_id)
    gen = state.generation(request, [prepared])
    fmt = ChatFormat(state, body, gen, response_id)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(gen, fmt, body.stream, include_usage, request)

