"""`LLM`: offline batched generation on top of the engine core."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from engine.engine_config import EngineConfig
from engine.errors import InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.request import CompletionOutput, RequestOutput, TokenLogprob
from engine.sampling_params import OutputKind, SamplingParams
from model.looplm import LoopLM
from model.tokenizer import Tokenizer, load_tokenizer
from model.weights import resolve_dtype


class LLM:
    """`LLM(model_dir_or_model, **engine_options).generate(prompts, params)`.

    engine_options are the fields of `EngineConfig` (device, dtype, block_size, ...).
    """

    def __init__(self, model: str | Path | LoopLM | None = None,
                 tokenizer: Tokenizer | None = None, **engine_options) -> None:
        config = EngineConfig(**engine_options)
        if isinstance(model, LoopLM):
            tokenizer = tokenizer or load_tokenizer(None, model.config)
            if config.device is not None or config.dtype != "auto":  # moves the module itself
                device = config.resolved_device()
                model = model.to(device=device,
                                 dtype=resolve_dtype(config.resolved_dtype(device)))
            self.engine = LLMEngine(model, tokenizer, config)
        else:
            self.engine = LLMEngine.from_pretrained(model, config)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: str | list[str] | list[int] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Outputs in prompt order; one SamplingParams for all or one per prompt."""
        prompts = _as_prompt_list(prompts)
        all_params = _as_params_list(params, len(prompts))
        # every output is merged before it is returned: no request needs a delta sooner
        prepared = [self.engine.prepare(p, dataclasses.replace(sp, output_kind=OutputKind.FINAL))
                    for p, sp in zip(prompts, all_params, strict=True)]
        ids = [self.engine.add_request(request) for request in prepared]
        finals: dict[str, RequestOutput] = {}
        accumulated: dict[str, dict[int, CompletionOutput]] = {i: {} for i in ids}
        prompt_logprobs: dict[str, list[TokenLogprob | None]] = {}  # in the first delta
        while self.engine.has_unfinished():
            for delta in self.engine.step():
                _accumulate(accumulated[delta.request_id], delta)
                if delta.prompt_logprobs is not None:
                    prompt_logprobs[delta.request_id] = delta.prompt_logprobs
                if delta.finished:
                    finals[delta.request_id] = delta
                    if use_tqdm:
                        print(f"\rfinished {len(finals)}/{len(ids)}", end="", file=sys.stderr)
        if use_tqdm:
            print(file=sys.stderr)
        return [_merged(finals[i], accumulated[i], prompt_logprobs.get(i)) for i in ids]


def _as_prompt_list(prompts) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InvalidRequestError("prompts must be a non-empty list of strings or token lists")
    return list(prompts)


def _as_params_list(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise InvalidRequestError(f"got {len(params)} SamplingParams for {count} prompts")
    return list(params)


def _accumulate(choices: dict[int, CompletionOutput], delta: RequestOutput) -> None:
    for piece in delta.outputs:
        choice = choices.setdefault(piece.index, CompletionOutput(piece.index, [], "", logprobs=[]))
        choice.token_ids += piece.token_ids
        choice.text += piece.text
        choice.finish_reason, choice.stop_reason = piece.finish_reason, piece.stop_reason
        choice.num_tokens = piece.num_tokens
        if piece.logprobs is not None:
            choice.logprobs += piece.logprobs


def _merged(final: RequestOutput, choices: dict[int, CompletionOutput],
            prompt_logprobs: list[TokenLogprob | None] | None) -> RequestOutput:
    outputs = [choices[i] for i in sorted(choices)]
    for choice in outputs:
        if not choice.logprobs:
            choice.logprobs = None
    final.outputs = outputs
    final.prompt_logprobs = prompt_logprobs
    return final
