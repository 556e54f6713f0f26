"""Request and response bodies of the HTTP API (DESIGN section 6), as pydantic models.

Requests are validated strictly (a string is not an integer, a bool is not a number) so that
wrong types get a 400 naming the field, and unknown fields are ignored, as OpenAI does.
Next to OpenAI's fields, requests take vLLM's extras (top_k, min_p, repetition_penalty,
ignore_eos, stop_token_ids) and loopserve's compute knobs (halt_threshold, max_loops).

Responses are documented here; the routes build streaming chunks as plain dicts of the same
shape (the tests validate them against these models).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_prompt(value: object) -> object:
    """str | list[str] | list[int] | list[list[int]], with one message for all four."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if all(isinstance(p, str) for p in value) or all(_is_int(t) for t in value):
            return value
        if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in value):
            return value
    raise ValueError("prompt must be a string, a list of strings, a list of token ids or a "
                     "list of token-id lists")


def _check_stop(value: object) -> object:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("stop must be a string or a list of strings")


def _check_content(value: object) -> object:
    if value is None or isinstance(value, (str, list)):
        return value
    raise ValueError("content must be a string or a list of text parts")


PromptInput = Annotated[Any, BeforeValidator(_check_prompt)]
StopInput = Annotated[Any, BeforeValidator(_check_stop)]
ContentInput = Annotated[Any, BeforeValidator(_check_content)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingRequest(StrictModel):
    """Fields shared by completions and chat completions."""

    model: str | None = None  # None: the served model
    n: int = 1
    temperature: float | None = None  # None: 1.0
    top_p: float | None = None  # None: 1.0
    stop: StopInput = None
    seed: Seed | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # accepted only when empty
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    # loopserve's test-time compute knobs
    halt_threshold: float | None = None
    max_loops: int | None = None


class CompletionRequest(SamplingRequest):
    prompt: PromptInput
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None  # accepted only when equal to n
    suffix: str | None = None  # not supported: 400 when set


class ChatMessage(StrictModel):
    role: str
    content: ContentInput = None
    name: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # None: up to the context
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None  # not supported: 400 when non-empty
    response_format: dict[str, Any] | None = None  # only {"type": "text"}


class TokenizeRequest(StrictModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # the bos token, for a prompt
    add_generation_prompt: bool = True  # for messages


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------------- responses
class Compute(BaseModel):
    """What one request spent (DESIGN section 6)."""

    max_loops: int
    mean_loops_per_token: float
    loops_per_layer: list[float]
    memory_gate_per_layer: list[float]
    flops: int
    flops_max_depth: int
    compute_saved: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    compute: Compute | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loopserve"
    max_model_len: int
    max_loops: int
    n_layers: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class HealthResponse(BaseModel):
    status: str


class VersionResponse(BaseModel):
    version: str
