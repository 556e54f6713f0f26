"""POST /v1/completions: one or several prompts (text or token ids), n choices each, echo,
logprobs (with echo: the prompt's too, as lm-evaluation-harness scores loglikelihoods),
vLLM's prompt_logprobs, streaming as SSE with an optional final usage chunk."""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from engine.request import CompletionOutput
from model.tokenizer import Tokenizer
from server.formatting import CompletionLogprobs, TextOffsets, prompt_logprobs, usage
from server.generation import Generation
from server.openapi import COMPLETION_RESPONSES
from server.params import check_model, check_priority, completion_inputs, prompt_list
from server.responding import Choice, respond
from server.schemas import CompletionRequest, CompletionResponse
from server.state import ServerState, server_state

router = APIRouter()


class CompletionFormat:
    """Builds completion bodies and chunks; keeps each choice's echo, logprobs and text
    offsets across its chunks."""

    def __init__(self, state: ServerState, body: CompletionRequest, gen: Generation,
                 response_id: str) -> None:
        self.gen = gen
        self.tokenizer = state.processor.tokenizer
        self.n = body.n
        self.body = body
        self.head = {"id": response_id, "object": "text_completion",
                     "created": int(time.time()), "model": state.model_name}
        self.echoes = _echo_texts(body, self.tokenizer) if body.echo else None
        count = len(gen.prompts) * body.n
        self.logprobs = ([CompletionLogprobs(self.tokenizer) for _ in range(count)]
                         if body.logprobs is not None else None)
        self.offsets = [TextOffsets(self.tokenizer, len(self._echo(i))) for i in range(count)]
        self.usage_null = bool(body.stream_options and body.stream_options.include_usage)

    def _echo(self, index: int) -> str:
        return self.echoes[index // self.n] if self.echoes else ""

    def _start_choice(self, index: int) -> dict[str, Any]:
        """What a choice's first chunk (or its whole body) carries before its tokens: the
        echoed prompt's logprobs and vLLM's prompt_logprobs."""
        prompt = index // self.n
        entries = self.gen.tallies[prompt].prompt_logprobs
        ids = self.gen.prompts[prompt]
        if self.logprobs is not None and self.echoes is not None and entries is not None:
            self.logprobs[index].add_prompt(ids, entries, self.body.logprobs)
        if self.body.prompt_logprobs is None or entries is None:
            return {}
        return {"prompt_logprobs": prompt_logprobs(self.tokenizer, ids, entries,
                                                   self.body.prompt_logprobs)}

    def _logprobs(self, index: int, items: list | None) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        self.logprobs[index].add_generated(items or [], self.offsets[index])
        return self.logprobs[index].take()

    def _choice(self, index: int, text: str, items: list | None, finish_reason: str | None,
                stop_reason: str | int | None, extra: dict[str, Any]) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": self._logprobs(index, items),
                "finish_reason": finish_reason, "stop_reason": stop_reason, **extra}

    def chunk(self, prompt_index: int, piece: CompletionOutput, first: bool
              ) -> dict[str, Any] | None:
        index = prompt_index * self.n + piece.index
        extra = self._start_choice(index) if first else {}
        text = (self._echo(index) if first else "") + piece.text
        choice = self._choice(index, text, piece.logprobs, piece.finish_reason,
                              piece.stop_reason, extra)
        logprobs = choice["logprobs"]
        if not (text or extra or (logprobs and logprobs["tokens"])
                or piece.finish_reason is not None):
            return None
        chunk = {**self.head, "choices": [choice]}
        if self.usage_null:
            chunk["usage"] = None
        return chunk

    def response(self, choices: list[Choice]) -> dict[str, Any]:
        body = [self._choice(i, self._echo(i) + c.text, c.logprobs, c.finish_reason,
                             c.stop_reason, self._start_choice(i))
                for i, c in enumerate(choices)]
        return {**self.head, "choices": body, "usage": usage(self.gen.tallies)}


def _echo_texts(body: CompletionRequest, tokenizer: Tokenizer) -> list[str]:
    """The prompts as text: a text prompt as sent, token ids decoded."""
    return [p if isinstance(p, str) else tokenizer.decode(p) for p in prompt_list(body.prompt)]


@router.post("/v1/completions", response_model=CompletionResponse,
             responses=COMPLETION_RESPONSES)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = server_state(request)
    with state.counting_invalid():
        check_model(body.model, state.model_name)
        check_priority(body, state.engine.config.scheduling_policy)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        prepared = completion_inputs(body, state.processor, state.settings.max_prompts,
                                     response_id)
    gen = state.generation(request, prepared)
    fmt = CompletionFormat(state, body, gen, response_id)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await respond(gen, fmt, body.stream, include_usage, request)
