"""What the sync and async clients share: URLs, headers, request bodies, SSE decoding, and
turning HTTP responses and transport failures into results or typed errors. No I/O here."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from clients.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    StreamError,
    error_fields,
    status_error,
)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
# request fields the clients know; anything else goes through `extra_body`
SAMPLING_FIELDS = frozenset({
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "n",
    "stop", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "logit_bias", "logprobs", "top_logprobs", "echo", "user", "ignore_eos",
    "stop_token_ids", "halt_threshold", "max_loops",
})
Message = Mapping[str, Any]


def api_root(base_url: str) -> str:
    """"http://host:8000", "http://host:8000/" and "http://host:8000/v1" -> "http://host:8000"."""
    root = base_url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def headers(api_key: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    result = {"Accept": "application/json", "User-Agent": "loopserve-client"}
    if api_key:
        result["Authorization"] = f"Bearer {api_key}"
    result.update(extra or {})
    return result


def request_body(model: str | None, params: Mapping[str, Any], stream: bool,
                 include_usage: bool = True) -> dict[str, Any]:
    """The JSON body's sampling part; None values are left out so server defaults apply."""
    params = dict(params)
    extra = params.pop("extra_body", None) or {}
    unknown = sorted(set(params) - SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown request field(s) {', '.join(unknown)}; known: "
                        f"{', '.join(sorted(SAMPLING_FIELDS))} (others go in extra_body)")
    body: dict[str, Any] = {k: v for k, v in params.items() if v is not None}
    if model is not None:
        body["model"] = model
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    body.update(extra)
    return body


def completion_body(prompt: str | list, model: str | None, params: Mapping[str, Any],
                    stream: bool) -> dict[str, Any]:
    return {"prompt": prompt, **request_body(model, params, stream)}


def chat_body(messages: list[Message] | str, model: str | None, params: Mapping[str, Any],
              stream: bool) -> dict[str, Any]:
    if isinstance(messages, str):  # a bare string is one user message
        messages = [{"role": "user", "content": messages}]
    return {"messages": [dict(m) for m in messages], **request_body(model, params, stream)}


def request_id(response: httpx.Response) -> str | None:
    return response.headers.get("x-request-id")


def raise_for_status(response: httpx.Response) -> None:
    """A typed error with the server's message for any 4xx/5xx (the body must be read)."""
    if response.status_code >= 400:
        raise status_error(response.status_code, response.text, dict(response.headers),
                           request_id(response))


def response_json(response: httpx.Response) -> dict[str, Any]:
    raise_for_status(response)
    try:
        data = response.json()
    except ValueError as exc:
        raise APIStatusError(f"the server sent a body that is not JSON: {response.text[:200]!r}",
                             status_code=response.status_code,
                             request_id=request_id(response)) from exc
    if not isinstance(data, dict):
        raise APIStatusError(f"expected a JSON object, got {type(data).__name__}",
                             status_code=response.status_code, request_id=request_id(response))
    return data


def transport_error(error: httpx.HTTPError, url: str) -> APIConnectionError:
    """httpx's failures (no usable answer) as the clients' connection errors."""
    kind = type(error).__name__
    if isinstance(error, httpx.TimeoutException):
        return APITimeoutError(f"no answer from {url} in time ({kind})")
    if isinstance(error, httpx.ConnectError):
        return APIConnectionError(f"could not reach {url}: {error or kind}")
    return APIConnectionError(f"{kind} from {url}: {error}")


def sse_event(line: str) -> dict[str, Any] | None:
    """The JSON of one SSE `data:` line; None for comments, blank lines and `[DONE]`.

    An error event ({"error": {...}}) is raised as `StreamError`.
    """
    if not line.startswith("data:"):
        return None  # blank separator, ":" comment, "event:" or "id:" field
    data = line[len("data:"):].strip()
    if not data or data == "[DONE]":
        return None
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise StreamError(f"the server sent a stream event that is not JSON: {data[:200]!r}"
                          ) from exc
    if isinstance(event, dict) and "error" in event and "choices" not in event:
        raise StreamError(**error_fields(event, "error in stream"), body=event)
    return event if isinstance(event, dict) else None


def is_done(line: str) -> bool:
    return line.startswith("data:") and line[len("data:"):].strip() == "[DONE]"
