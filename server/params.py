"""From a validated request body to the engine's inputs: prompts as token ids and one
`SamplingParams` per prompt. Values the engine cannot serve raise `InvalidRequestError`
(-> 400) naming the field; an unknown model raises a 404.
"""

from __future__ import annotations

from engine.errors import InvalidRequestError
from engine.input_processor import InputProcessor, PreparedRequest
from engine.sampling_params import OutputKind, SamplingParams
from server.errors import APIError
from server.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(404, f"the model '{requested}' does not exist; this server serves "
                            f"'{served}'", param="model", code="model_not_found")


def _reject_unsupported(body: SamplingRequest) -> None:
    if isinstance(body, CompletionRequest):
        if body.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise InvalidRequestError("best_of is not supported (it must be absent or equal n)",
                                      param="best_of")
    if isinstance(body, ChatCompletionRequest):
        if body.tools:
            raise InvalidRequestError("tools are not supported", param="tools")
        if body.response_format and body.response_format.get("type") != "text":
            raise InvalidRequestError("only response_format {'type': 'text'} is supported",
                                      param="response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs to be true",
                                      param="top_logprobs")


def check_priority(body: SamplingRequest, scheduling_policy: str) -> None:
    """A priority means something only under the priority policy (vLLM rejects it too)."""
    if body.priority and scheduling_policy != "priority":
        raise InvalidRequestError(
            f"priority {body.priority} needs the server to run with --scheduling-policy "
            f"priority (it runs {scheduling_policy}); leave priority out or at 0",
            param="priority")


def _value(value, default):
    return default if value is None else value


def prompt_logprobs_count(body: SamplingRequest) -> int | None:
    """How many alternatives per prompt token the engine must compute: vLLM's
    prompt_logprobs, and for an echo with logprobs the echoed prompt's top `logprobs`."""
    counts = [body.prompt_logprobs]
    if isinstance(body, CompletionRequest) and body.echo:
        counts.append(body.logprobs)
    given = [c for c in counts if c is not None]
    return max(given) if given else None


def sampling_params(body: SamplingRequest, max_tokens: int, logprobs: int | None
                    ) -> SamplingParams:
    """One prompt's SamplingParams; SamplingParams itself checks every range."""
    return SamplingParams(
        max_tokens=max_tokens, temperature=_value(body.temperature, 1.0),
        top_p=_value(body.top_p, 1.0), top_k=_value(body.top_k, -1),
        min_p=_value(body.min_p, 0.0),
        presence_penalty=_value(body.presence_penalty, 0.0),
        frequency_penalty=_value(body.frequency_penalty, 0.0),
        repetition_penalty=_value(body.repetition_penalty, 1.0),
        stop=_value(body.stop, ()), stop_token_ids=tuple(body.stop_token_ids or ()),
        seed=body.seed, n=body.n, logprobs=logprobs, ignore_eos=body.ignore_eos,
        halt_threshold=body.halt_threshold, max_loops=body.max_loops,
        prompt_logprobs=prompt_logprobs_count(body), min_tokens=_value(body.min_tokens, 0),
        logit_bias={int(token): bias for token, bias in (body.logit_bias or {}).items()},
        priority=_value(body.priority, 0),
        # a whole response needs nothing before the end: no per-token delta is built or sent
        output_kind=OutputKind.DELTA if body.stream else OutputKind.FINAL)


def _max_tokens(requested: int | None, prompt_len: int, engine: InputProcessor, param: str
                ) -> int:
    """The request's max_tokens, or what is left of the context when it gave none."""
    if requested is not None:
        return requested
    left = engine.max_model_len - prompt_len
    if left < 1:
        raise InvalidRequestError(
            f"this model's maximum context length is {engine.max_model_len} tokens and the "
            f"prompt has {prompt_len}; no room is left to generate", param=param,
            code="context_length_exceeded")
    return left


def _prepared(processor: InputProcessor, request_id: str, prompt: str | list[int],
              body: SamplingRequest, max_tokens: int | None, logprobs: int | None, param: str
              ) -> PreparedRequest:
    ids = processor.encode_prompt(prompt)
    params = sampling_params(body, _max_tokens(max_tokens, len(ids), processor, param),
                             logprobs)
    return processor.prepared(request_id, ids, params)


def request_ids(response_id: str, count: int) -> list[str]:
    """The engine request id of each prompt of one HTTP request."""
    return [response_id] if count == 1 else [f"{response_id}-{i}" for i in range(count)]


def prompt_list(prompt: str | list) -> list[str | list[int]]:
    """The prompts of a completions request: one string or token-id list, or a list of them."""
    if isinstance(prompt, str) or (prompt and not isinstance(prompt[0], (str, list))):
        return [prompt]
    return list(prompt)


def completion_inputs(body: CompletionRequest, processor: InputProcessor, max_prompts: int,
                      response_id: str) -> list[PreparedRequest]:
    """One prepared engine request per prompt of a /v1/completions request."""
    _reject_unsupported(body)
    prompts = prompt_list(body.prompt)
    if not prompts:
        raise InvalidRequestError("prompt must not be empty", param="prompt")
    if len(prompts) > max_prompts:
        raise InvalidRequestError(f"at most {max_prompts} prompts per request, got "
                                  f"{len(prompts)}", param="prompt")
    return [_prepared(processor, rid, p, body, body.max_tokens, body.logprobs, "prompt")
            for rid, p in zip(request_ids(response_id, len(prompts)), prompts, strict=True)]


def chat_inputs(body: ChatCompletionRequest, processor: InputProcessor, response_id: str
                ) -> PreparedRequest:
    """The prepared engine request of a chat request (the chat template applied)."""
    _reject_unsupported(body)
    ids = processor.tokenizer.apply_chat_template(chat_messages(body))
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = _value(body.max_completion_tokens, body.max_tokens)
    return _prepared(processor, response_id, ids, body, max_tokens, logprobs, "messages")


def chat_messages(body: ChatCompletionRequest | object) -> list[dict]:
    """Messages as the chat template wants them ('developer' is OpenAI's new 'system')."""
    messages = getattr(body, "messages", None) or []
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.content}
            for m in messages]
