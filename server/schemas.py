"""Request and response bodies of the HTTP API (DESIGN section 6), as pydantic models.

Requests are validated strictly (a string is not an integer, a bool is not a number, but a
whole-number float is an integer, as in OpenAI, vLLM and JSON Schema) so that wrong types
and values out of range get a 400 naming the field; unknown fields are ignored, as OpenAI
does. The ranges written here are the served OpenAPI document's (server/openapi.py adds the
model's own bounds). Next to OpenAI's fields, requests take vLLM's extras (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids, min_tokens, priority, prompt_logprobs) and
loopserve's compute knobs (halt_threshold, max_loops).

Responses are documented here; the routes build streaming chunks as plain dicts of the same
shape (the tests validate them against these models).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

from engine.sampling_params import MAX_LOGPROBS, MAX_N, MAX_SEED, MAX_STOP_STRINGS

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGIT_BIAS = 100.0  # OpenAI's range of a logit bias


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole_number(value: object) -> object:
    """1.0 is the integer 1 (OpenAI and vLLM accept it, and so does JSON Schema's
    "integer"); 1.5 is not an integer."""
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError("must be an integer")
    return value


def _token_id(value: object) -> object:
    """A token id as an int (a whole-number float is one); anything else as it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _check_prompt(value: object) -> object:
    """str | list[str] | list[int] | list[list[int]], with one message for all four."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if all(isinstance(p, str) for p in value):
            return value
        ids = [_token_id(t) for t in value]
        if all(_is_int(t) for t in ids):
            return ids
        lists = [[_token_id(t) for t in p] if isinstance(p, list) else p for p in value]
        if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in lists):
            return lists
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


def Whole(**bounds: Any) -> Any:  # a function that reads as a type in the models below
    """An integer field that also takes whole-number floats, with its documented bounds."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole_number)]


# what the OpenAPI document says of the fields validated by hand (the token-id bound
# depends on the model: server/openapi.py fills it in)
TOKEN_ID_SCHEMA = {"type": "integer", "minimum": 0}
TEXT_PART_SCHEMA = {"type": "object", "required": ["type", "text"],
                    "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
PROMPT_SCHEMA = {"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
    {"type": "array", "minItems": 1, "items": TOKEN_ID_SCHEMA},
    {"type": "array", "minItems": 1,
     "items": {"type": "array", "minItems": 1, "items": TOKEN_ID_SCHEMA}}]}
STOP_SCHEMA = {"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": {"type": "string", "minLength": 1}},
    {"type": "null"}]}
CONTENT_SCHEMA = {"anyOf": [{"type": "string"},
                            {"type": "array", "items": TEXT_PART_SCHEMA}]}

PromptInput = Annotated[Any, BeforeValidator(_check_prompt), WithJsonSchema(PROMPT_SCHEMA)]
StopInput = Annotated[Any, BeforeValidator(_check_stop), WithJsonSchema(STOP_SCHEMA)]
ContentInput = Annotated[Any, BeforeValidator(_check_content), WithJsonSchema(CONTENT_SCHEMA)]
TokenId = Whole(ge=0)
TokenBias = Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]
TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingRequest(StrictModel):
    """Fields shared by completions and chat completions."""

    model: str | None = None  # None: the served model
    n: Whole(ge=1, le=MAX_N) = 1
    temperature: Annotated[float, Field(ge=0)] | None = None  # None: 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None  # None: 1.0
    stop: StopInput = None
    seed: Whole(ge=0, le=MAX_SEED) | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[TokenIdKey, TokenBias] | None = None  # token id (as a string) -> bias
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: Whole(ge=-1) | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    min_tokens: Whole(ge=0) | None = None
    priority: Whole(ge=INT64_MIN, le=INT64_MAX) | None = None  # lower is served first
    prompt_logprobs: Whole(ge=0, le=MAX_LOGPROBS) | None = None
    # loopserve's test-time compute knobs
    halt_threshold: Annotated[float, Field(ge=0, lt=1)] | None = None
    max_loops: Whole(ge=1) | None = None


class CompletionRequest(SamplingRequest):
    prompt: PromptInput
    max_tokens: Whole(ge=0) | None = 16  # 0: score the prompt only (echo with logprobs)
    echo: bool = False
    logprobs: Whole(ge=0, le=MAX_LOGPROBS) | None = None
    # accepted only when equal to n, so left out of the document (no schema can say that)
    best_of: SkipJsonSchema[Whole(ge=1, le=MAX_N) | None] = None
    suffix: SkipJsonSchema[str | None] = None  # not supported: 400 when set (undocumented)


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: ContentInput
    name: str | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Whole(ge=1) | None = None  # None: up to the context
    max_completion_tokens: Whole(ge=1) | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: Whole(ge=0, le=MAX_LOGPROBS) | None = None
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
    tokens: list[TokenId]


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


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens served from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    compute: Compute | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy layout; with echo the prompt's tokens come first, the first of them
    with null logprobs (nothing precedes it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's entry for one token at one prompt position."""

    logprob: float
    rank: int | None = None  # 1 = most likely; null when not among the top alternatives
    decoded_token: str


# vLLM's prompt_logprobs: one entry per prompt token, null first; each maps a token id (as a
# JSON key) to its logprob: the prompt's own token and the top alternatives
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None


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
    prompt_logprobs: PromptLogprobs | None = None  # vLLM puts chat's here, not in a choice


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
    prompt_logprobs: PromptLogprobs | None = None  # in the first chunk, when asked for


class CompletionChunk(BaseModel):
    """One event of a streamed completion (the same shape as a whole response)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
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


class TokenizerInfoResponse(BaseModel):
    """vLLM's GET /tokenizer_info: the tokenizer_config.json a client needs to tokenize and
    to apply the chat template itself (lm-evaluation-harness's remote tokenizer reads it)."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    model_max_length: int
    chat_template: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error the server sends (OpenAI's error object)."""

    error: ErrorDetail


class HealthResponse(BaseModel):
    status: str


class VersionResponse(BaseModel):
    version: str
