"""The small routes: /v1/models, /tokenize, /detokenize, /tokenizer_info, /health, /version,
/metrics."""

from __future__ import annotations

import importlib.metadata

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from engine.async_engine import HealthState
from engine.errors import InvalidRequestError
from model.tokenizer import ByteTokenizer, Tokenizer, hf_chat_template, hf_tokenizer_config
from server.errors import error_body
from server.openapi import error_responses
from server.params import chat_messages, check_model
from server.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    VersionResponse,
)
from server.state import ServerState, server_state

router = APIRouter()


def server_version() -> str:
    try:
        return importlib.metadata.version("loopserve")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0+source"


def _card(state: ServerState) -> ModelCard:
    cfg = state.processor.model_config
    return ModelCard(id=state.model_name, created=state.created,
                     max_model_len=state.processor.max_model_len, max_loops=cfg.max_loops,
                     n_layers=cfg.n_layers)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(server_state(request))])


@router.get("/v1/models/{model:path}", response_model=ModelCard)
async def get_model(model: str, request: Request) -> ModelCard:
    state = server_state(request)
    check_model(model, state.model_name)
    return _card(state)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """A prompt (with the bos token unless add_special_tokens is false; a special token's
    name in it is that token) or chat messages."""
    state = server_state(request)
    check_model(body.model, state.model_name)
    tokenizer = state.processor.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequestError("give exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        tokens = tokenizer.apply_chat_template(chat_messages(body), body.add_generation_prompt)
    else:
        # special tokens' names are those tokens, as vLLM's Hugging Face tokenizers read them
        # (remote-tokenizer clients render the chat template to text and tokenize it here)
        tokens = tokenizer.encode_special_names(body.prompt, add_bos=body.add_special_tokens)
    return TokenizeResponse(count=len(tokens), max_model_len=state.processor.max_model_len,
                            tokens=tokens)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = server_state(request)
    check_model(body.model, state.model_name)
    vocab = state.processor.model_config.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise InvalidRequestError(f"tokens must be integers in [0, {vocab}), got {bad[0]}",
                                  param="tokens")
    return DetokenizeResponse(prompt=state.processor.tokenizer.decode(body.tokens))


def tokenizer_info(tokenizer: Tokenizer, max_model_len: int) -> dict:
    """What vLLM's /tokenizer_info serves: the tokenizer_config.json of the served tokenizer
    (for the byte tokenizer, the one the bundled model ships), with the chat template."""
    if isinstance(tokenizer, ByteTokenizer):
        return hf_tokenizer_config(tokenizer, max_model_len)
    bos, eos = tokenizer.token_text(tokenizer.bos_token_id), tokenizer.token_text(
        tokenizer.eos_token_id)
    return {"tokenizer_class": type(tokenizer).__name__, "bos_token": bos, "eos_token": eos,
            "pad_token": tokenizer.token_text(tokenizer.pad_token_id),
            "model_max_length": max_model_len,
            "chat_template": hf_chat_template(tokenizer.role_markers, bos, eos)}


@router.get("/tokenizer_info", response_model=TokenizerInfoResponse)
async def get_tokenizer_info(request: Request) -> JSONResponse:
    processor = server_state(request).processor
    return JSONResponse(tokenizer_info(processor.tokenizer, processor.max_model_len))


@router.get("/health", response_model=HealthResponse, responses=error_responses(503))
async def health(request: Request) -> Response:
    """200 only while the engine loop is alive, making progress and accepting requests."""
    status = server_state(request).engine.health()
    if status.ok:
        return JSONResponse({"status": "ok"})
    code = "draining" if status.state is HealthState.DRAINING else "engine_unavailable"
    return JSONResponse(error_body(503, status.reason, code=code), status_code=503)


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=server_version())


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = server_state(request).metrics.exposition(
        request.headers.get("accept"))
    return Response(body, media_type=content_type)
