"""The front door: a prompt and its `SamplingParams` become a typed, frozen
`PreparedRequest`, tokenized and validated once. The engine loop trusts what it gets.

`InputProcessor` holds only what does not change while serving (tokenizer, model config,
context length, pool size), so the server may call it from the event loop while the engine
steps on its own thread.
"""

from __future__ import annotations

import dataclasses
import time

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams
from model.config import ModelConfig
from model.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class PreparedRequest:
    """A request the engine can serve: every check has passed."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    halt_threshold: float  # resolved: the request's or the model's default
    max_loops: int  # resolved: the request's or N
    arrival_time: float


@dataclasses.dataclass(frozen=True)
class InputProcessor:
    tokenizer: Tokenizer
    model_config: ModelConfig
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    max_num_seqs: int

    def encode_prompt(self, prompt: str | list[int] | tuple[int, ...]) -> list[int]:
        """Token ids of a prompt (text gets the bos token); validates ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty", param="prompt")
            return self.tokenizer.encode(prompt, add_bos=True)
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab}), got "
                                      f"{bad[0]!r}", param="prompt")
        return ids

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Everything that makes a request impossible to serve, as InvalidRequestError."""
        params.check_against(self.model_config)
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the "
                f"prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}; "
                f"reduce the prompt or max_tokens", param="max_tokens",
                code="context_length_exceeded")
        need = -(-(len(prompt_ids) + params.max_tokens) // self.block_size)
        if need > self.num_kv_blocks:
            raise InvalidRequestError(
                f"the request needs {need} KV blocks but the pool has {self.num_kv_blocks}; "
                f"reduce the prompt or max_tokens", param="max_tokens")
        if params.n > self.max_num_seqs:
            raise InvalidRequestError(
                f"n must be at most {self.max_num_seqs} (the engine's max_num_seqs), got "
                f"{params.n}", param="n")

    def prepare(self, request_id: str, prompt: str | list[int] | tuple[int, ...],
                params: SamplingParams, arrival_time: float | None = None) -> PreparedRequest:
        return self.prepared(request_id, self.encode_prompt(prompt), params, arrival_time)

    def prepared(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 arrival_time: float | None = None) -> PreparedRequest:
        """The request for ids that `encode_prompt` returned."""
        self.check(prompt_ids, params)
        cfg = self.model_config
        ids = prompt_ids
        return PreparedRequest(
            request_id=request_id, prompt_token_ids=tuple(ids), params=params,
            halt_threshold=params.resolved_threshold(cfg),
            max_loops=params.resolved_max_loops(cfg),
            arrival_time=time.monotonic() if arrival_time is None else arrival_time)
