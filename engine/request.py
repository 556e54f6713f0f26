"""`Request`: all state of one sequence being generated, and the outputs handed to users.

A request with n > 1 choices is n `Request`s sharing a `parent_id`; the engine merges their
outputs into one `RequestOutput`. Only the first choice (the leader, which computes the
prompt) collects prompt logprobs; the choices share them in the output.
"""

from __future__ import annotations

import dataclasses
import enum
import time

import torch

from engine.block_hash import BlockHash, extend_hashes
from engine.compute_stats import ComputeSummary, ComputeTracker
from engine.sampling_params import SamplingParams
from model.tokenizer import StreamDecoder


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class TokenLogprob:
    """Log-probability of one generated token and the top alternatives at its position."""

    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]]
    rank: int | None = None  # 1 + how many tokens were more likely (vLLM's rank)


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence: tokens, progress, block table owner id, sampling state, compute stats."""

    request_id: str
    parent_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    halt_threshold: float  # resolved: the request's or the model's default
    max_loops: int  # resolved: the request's or N
    compute: ComputeTracker
    eos_token_id: int
    max_total_tokens: int  # the model's context: prompt + output never exceed it
    block_size: int  # of the KV cache: the hash chain covers full blocks of token_ids
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    # entry j: prompt token j given tokens < j (entry 0 is None); set when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_emitted: bool = False
    generator: torch.Generator | None = None  # of a seeded request, on the logits' device
    detokenizer: StreamDecoder | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # OutputKind.FINAL (leader only): when each step that a delta would have left held it back
    held_delta_times: list[float] = dataclasses.field(default_factory=list)
    # detokenized text so far and how much of it was already handed out
    text: str = ""
    emitted_text_len: int = 0
    emitted_token_len: int = 0
    # hash chain of the full blocks of token_ids (prefix caching), extended as tokens come
    block_hashes: list[BlockHash] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        extend_hashes(self.block_hashes, self.token_ids, self.block_size, self.extra_keys)
        if self.params.prompt_logprobs is not None and self.index == 0:
            self.prompt_logprobs = [None]

    def generator_on(self, device: torch.device) -> torch.Generator | None:
        """The seeded request's own generator, created on `device` at its first draw (None
        if unseeded). Choice i draws from seed + i, so the n choices differ."""
        if self.params.seed is None:
            return None
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(
                self.params.seed + self.index)
        return self.generator

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if len(self.token_ids) % self.block_size == 0:
            extend_hashes(self.block_hashes, self.token_ids, self.block_size, self.extra_keys)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def num_prompt_logprobs_missing(self) -> int:
        """Prompt logprob entries still to compute (0 when none were asked for)."""
        if self.prompt_logprobs is None:
            return 0
        return self.prompt_len - len(self.prompt_logprobs)

    @property
    def extra_keys(self) -> tuple:
        """What besides the tokens changes this request's cached k/v."""
        return (self.halt_threshold, self.max_loops)


@dataclasses.dataclass
class CompletionOutput:
    """One choice of a request: the generated tokens and text so far (or the delta)."""

    index: int
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the stop string or token that ended it
    logprobs: list[TokenLogprob] | None = None
    num_tokens: int = 0  # generated tokens in all (not only the delta)


@dataclasses.dataclass
class RequestOutput:
    """What the engine hands back for a request: every choice, and its compute."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    compute: ComputeSummary | None = None  # DESIGN section 6, set when finished
    num_cached_tokens: int = 0
    metrics: dict | None = None  # arrival, first token, finish times (seconds, monotonic)
    # one entry per prompt token, entry 0 None (as vLLM); in the first delta only
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # when each delta merged into this one was ready, oldest first (engine/output_merge.py)
    merged_ready_times: tuple[float, ...] = ()

    # the first choice's fields, for the common n = 1 case
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        return self.outputs[0].logprobs
