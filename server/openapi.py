"""The served OpenAPI document (/openapi.json), made to say what the server does:

- errors are OpenAI error objects with the statuses of DESIGN section 6 (400, never
  FastAPI's 422; 401 when API keys are set; 404, 413, 429, 503, 504 where they can occur);
- `stream: true` answers `text/event-stream`, each event a `data:` line holding a
  CompletionChunk or ChatCompletionChunk and the last one `data: [DONE]`;
- request bounds that depend on the served model and the server's settings (context
  length, vocabulary, loops, the engine's max_num_seqs, --max-prompts) are filled into the
  schemas server/schemas.py writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from pydantic import TypeAdapter

from server.schemas import ChatCompletionChunk, CompletionChunk, ErrorResponse

ERROR_DESCRIPTIONS = {
    400: "Bad input: a field of the wrong type or out of range, a prompt over the context "
         "(code context_length_exceeded)",
    401: "Missing or invalid API key",
    404: "Unknown model or route",
    405: "Method not allowed",
    413: "Request body too large",
    429: "The queue is full (see Retry-After)",
    503: "Draining or the engine is unavailable",
    504: "The request ran past its deadline",
}
SSE_DESCRIPTION = ("With stream: true, server-sent events: `data: <chunk JSON>` per event "
                   "(the {chunk} schema), the usage chunk when stream_options.include_usage, "
                   "an error object if the request fails midway, and `data: [DONE]` last.")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
            for status in statuses}


def _sse(chunk: str) -> dict[int | str, dict[str, Any]]:
    """The stream's media type; before OpenAPI 3.2 (`itemSchema`) its schema is one event's."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    data = {"anyOf": [{"const": "[DONE]"},
                      {"type": "string", "contentMediaType": "application/json",
                       "contentSchema": payload}]}
    event = {"type": "object", "required": ["data"],
             "properties": {"data": data, "event": {"const": "message"}},
             "description": SSE_DESCRIPTION.format(chunk=chunk)}
    return {200: {"description": "The completion (JSON), or its stream (SSE)",
                  "content": {"text/event-stream": {"schema": event}}}}


GENERATION_RESPONSES = {**error_responses(400, 404, 413, 429, 503, 504)}
COMPLETION_RESPONSES = {**_sse("CompletionChunk"), **GENERATION_RESPONSES}
CHAT_RESPONSES = {**_sse("ChatCompletionChunk"), **GENERATION_RESPONSES}


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """The served model's and the server's bounds on requests."""

    max_model_len: int
    vocab_size: int
    max_loops: int
    max_n: int
    max_prompts: int  # of one /v1/completions request
    api_keys: bool  # 401 is possible
    model_name: str  # the one model `model` may name


def _integer_schemas(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The integer schemas of a property: itself, or the branches of its anyOf."""
    for branch in [schema, *schema.get("anyOf", [])]:
        if branch.get("type") == "integer":
            yield branch


def _set_maximum(schemas: dict[str, Any], model: str, field: str, maximum: int) -> None:
    prop = schemas[model]["properties"][field]
    items = [prop.get("items", {})] + [b.get("items", {}) for b in prop.get("anyOf", [])]
    targets = list(_integer_schemas(prop)) or [s for i in items for s in _integer_schemas(i)]
    for target in targets:
        target["maximum"] = min(maximum, target.get("maximum", maximum))


def numbers_up_to(limit: int) -> str:
    """A regex of the decimal numbers 0..limit, written without leading zeros."""
    digits = str(limit)
    if len(digits) == 1:
        return f"^[0-{limit}]$"
    options = ["[0-9]"] + [f"[1-9][0-9]{{{n - 1}}}" for n in range(2, len(digits))]
    for i, digit in enumerate(digits):  # below the limit from digit i on
        low = 1 if i == 0 else 0
        if int(digit) > low:
            options.append(f"{digits[:i]}[{low}-{int(digit) - 1}][0-9]{{{len(digits) - i - 1}}}")
    return "^(" + "|".join([*options, digits]) + ")$"


def _string_branch(prop: dict[str, Any]) -> dict[str, Any]:
    return next(b for b in [prop, *prop.get("anyOf", [])] if b.get("type") == "string")


def _object_branch(prop: dict[str, Any]) -> dict[str, Any]:
    return next(b for b in [prop, *prop.get("anyOf", [])] if b.get("type") == "object")


def _token_id_schemas(node: Any) -> Iterator[dict[str, Any]]:
    """Every token-id schema inside a prompt's anyOf (integers with minimum 0)."""
    if isinstance(node, dict):
        if node.get("type") == "integer" and node.get("minimum") == 0:
            yield node
        for value in node.values():
            yield from _token_id_schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from _token_id_schemas(value)


def _model_bounds(schemas: dict[str, Any], limits: RequestLimits) -> None:
    last_id = limits.vocab_size - 1
    for model in ("CompletionRequest", "ChatCompletionRequest"):
        fields = {"max_tokens": limits.max_model_len, "min_tokens": limits.max_model_len,
                  "max_loops": limits.max_loops, "n": limits.max_n,
                  "stop_token_ids": last_id}
        if model == "ChatCompletionRequest":
            fields["max_completion_tokens"] = limits.max_model_len
        for field, maximum in fields.items():
            _set_maximum(schemas, model, field, maximum)
        props = schemas[model]["properties"]
        _string_branch(props["model"])["enum"] = [limits.model_name]
        _object_branch(props["logit_bias"])["propertyNames"] = {
            "type": "string", "pattern": numbers_up_to(last_id)}
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]
    for node in _token_id_schemas(prompt):
        node["maximum"] = last_id
    for branch in prompt["anyOf"]:  # several prompts: strings or token-id lists
        if branch.get("type") == "array" and branch["items"].get("type") != "integer":
            branch["maxItems"] = limits.max_prompts
    _set_maximum(schemas, "DetokenizeRequest", "tokens", last_id)


def _chunk_schemas(schemas: dict[str, Any]) -> None:
    """The SSE chunk models, so that the stream's description can name them."""
    for model in (CompletionChunk, ChatCompletionChunk):
        schema = TypeAdapter(model).json_schema(ref_template="#/components/schemas/{model}")
        for name, definition in schema.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas[model.__name__] = schema


def _error_statuses(path: str, method: str, operation: dict[str, Any], limits: RequestLimits
                    ) -> list[int]:
    statuses = []
    if limits.api_keys and path not in ("/health", "/metrics"):
        statuses.append(401)
    if "requestBody" in operation or operation.get("parameters"):
        statuses.append(400)
    if method == "post":
        statuses += [404, 413]  # an unknown model; a body over the limit
    if "{" in path:
        statuses.append(404)
    if path == "/health":
        statuses.append(503)
    return statuses


def _model_path(openapi: dict[str, Any], limits: RequestLimits) -> None:
    for parameter in openapi["paths"]["/v1/models/{model}"]["get"]["parameters"]:
        if parameter["name"] == "model":
            parameter["schema"]["enum"] = [limits.model_name]


def _errors(openapi: dict[str, Any], limits: RequestLimits) -> None:
    """400 instead of 422 everywhere, and each route's other error statuses."""
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            responses.pop("422", None)
            for status in _error_statuses(path, method, operation, limits):
                responses.setdefault(str(status), {
                    "description": ERROR_DESCRIPTIONS[status],
                    "content": {"application/json": {"schema": ref}}})
    schemas = openapi["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _metrics(openapi: dict[str, Any]) -> None:
    """/metrics is Prometheus text (or OpenMetrics when the scraper asks for it)."""
    text = {"schema": {"type": "string"}}
    openapi["paths"]["/metrics"]["get"]["responses"]["200"]["content"] = {
        "text/plain": text, "application/openmetrics-text": text}


def install_openapi(app: FastAPI, limits: RequestLimits) -> None:
    """Serve the document above (built once, on the first request for it)."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = build()
            schemas = document["components"]["schemas"]
            _model_bounds(schemas, limits)
            _chunk_schemas(schemas)
            _model_path(document, limits)
            _errors(document, limits)
            _metrics(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
