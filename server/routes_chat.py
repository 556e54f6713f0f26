"""POST /v1/chat/completions: the tokenizer's chat template, n choices, logprobs with
top_logprobs, vLLM's prompt_logprobs (on the response, as vLLM puts them; in the first chunk
of a stream), streaming as SSE (role first, then content deltas) with an optional usage
chunk."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.request import CompletionOutput
from server.formatting import chat_logprobs, prompt_logprobs, usage
from server.generation import Generation
from server.openapi import CHAT_RESPONSES
from server.params import chat_inputs, check_model, check_priority
from server.responding import Choice, respond
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
        self.prompt_logprobs_k = body.prompt_logprobs
        self._prompt_logprobs_sent = False

    def _prompt_logprobs(self) -> dict[str, Any]:
        """vLLM's prompt_logprobs, once per response (they belong to the one prompt)."""
        entries = self.gen.tallies[0].prompt_logprobs
        if self.prompt_logprobs_k is None or entries is None or self._prompt_logprobs_sent:
            return {}
        self._prompt_logprobs_sent = True
        return {"prompt_logprobs": prompt_logprobs(self.tokenizer, self.gen.prompts[0], entries,
                                                   self.prompt_logprobs_k)}

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
        chunk = {**self.head, "choices": [choice], **self._prompt_logprobs()}
        if self.usage_null:
            chunk["usage"] = None
        return chunk

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        body = [{"index": i, "message": {"role": "assistant", "content": c.text},
                 "logprobs": self._logprobs(c.logprobs), "finish_reason": c.finish_reason,
                 "stop_reason": c.stop_reason} for i, c in enumerate(choices)]
        return {**self.head, "object": "chat.completion", "choices": body,
                "usage": usage(self.gen.tallies), **self._prompt_logprobs()}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses=CHAT_RESPONSES)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = server_state(request)
    with state.counting_invalid():
        check_model(body.model, state.model_name)
        check_priority(body, state.engine.config.scheduling_policy)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        prepared = chat_inputs(body, state.processor, response_id)
    gen = state.generation(request, [prepared])
    fmt = ChatFormat(state, body, gen, response_id)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(gen, fmt, body.stream, include_usage, request)

