"""`SamplingParams`: how to sample one request, validated with errors a user can act on."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import NoReturn

from engine.errors import InvalidRequestError
from model.config import ModelConfig

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_N = 16
MAX_SEED = 2**63 - 1 - MAX_N  # seed + choice index must fit a torch generator seed
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100..100
MAX_PRIORITY = 2**63 - 1
SAMPLING_EPS = 1e-5  # temperatures below this sample greedily (as vLLM does)


def _fail(param: str, message: str) -> NoReturn:
    raise InvalidRequestError(message, param=param)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_bias_pairs(bias: object) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs, from a dict or pairs; checks each."""
    if bias is None:
        return ()
    items = bias.items() if isinstance(bias, dict) else bias
    try:
        pairs = [(token, value) for token, value in items]
    except (TypeError, ValueError):
        _fail("logit_bias", f"logit_bias must map token ids to biases, got {bias!r}")
    for token, value in pairs:
        if not _is_int(token) or token < 0:
            _fail("logit_bias", f"logit_bias keys must be token ids (integers >= 0), got "
                                f"{token!r}")
        if not _is_number(value) or not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
            _fail("logit_bias", f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, "
                                f"{MAX_LOGIT_BIAS:g}], got {value!r} for token {token}")
    if len({token for token, _ in pairs}) != len(pairs):
        _fail("logit_bias", "logit_bias lists a token id more than once")
    return tuple(sorted((token, float(value)) for token, value in pairs))


class OutputKind(enum.Enum):
    """When the engine hands out a request's tokens (vLLM's RequestOutputKind, less
    CUMULATIVE): DELTA after every step that produced some, FINAL once, when the request
    finishes, with everything (a whole HTTP response needs nothing sooner: no output is built,
    sent or woken for in between)."""

    DELTA = "delta"
    FINAL = "final"


_OUTPUT_KINDS = frozenset(kind.value for kind in OutputKind)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and compute options (DESIGN section 5).

    temperature 0 is greedy. halt_threshold None uses the model's default; max_loops None
    uses the model's N. prompt_logprobs k (vLLM's meaning) asks for the logprob of every
    prompt token after the first and its top k alternatives; with it, max_tokens may be 0
    (score the prompt only). min_tokens masks eos and stop_token_ids (and defers stop
    strings) until that many tokens are generated. logit_bias is stored as sorted
    (token id, bias) pairs so that the object stays hashable. priority orders admission
    under the priority policy (lower first, as vLLM). output_kind: see `OutputKind`.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: all tokens
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None  # number of top logprobs per token (0: only the sampled one)
    ignore_eos: bool = False
    halt_threshold: float | None = None
    max_loops: int | None = None
    prompt_logprobs: int | None = None  # top alternatives per prompt token (0: the token's)
    min_tokens: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    priority: int = 0
    output_kind: OutputKind = OutputKind.DELTA

    def __post_init__(self) -> None:
        # lists are accepted for convenience and stored as tuples (the object stays hashable)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _as_bias_pairs(self.logit_bias))
        self._check_lengths()
        self._check_logprobs()
        self._check_sampling()
        self._check_penalties()
        self._check_compute()

    def _check_lengths(self) -> None:
        least = 0 if self.prompt_logprobs is not None else 1
        if not _is_int(self.max_tokens) or self.max_tokens < least:
            _fail("max_tokens", f"max_tokens must be an integer >= 1 (0 only with "
                                f"prompt_logprobs), got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            _fail("min_tokens", f"min_tokens must be an integer between 0 and max_tokens "
                                f"({self.max_tokens}), got {self.min_tokens!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            _fail("n", f"n must be an integer between 1 and {MAX_N}, got {self.n!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            _fail("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed, got "
                          f"{len(self.stop)}")
        if not all(isinstance(s, str) and s for s in self.stop):
            _fail("stop", "stop strings must be non-empty strings")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            _fail("stop_token_ids", "stop_token_ids must be non-negative integers")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            _fail("seed", f"seed must be an integer between 0 and {MAX_SEED}, got {self.seed!r}")
        if isinstance(self.output_kind, str) and self.output_kind in _OUTPUT_KINDS:
            object.__setattr__(self, "output_kind", OutputKind(self.output_kind))
        if not isinstance(self.output_kind, OutputKind):
            _fail("output_kind", f"output_kind must be one of "
                                 f"{[k.value for k in OutputKind]}, got {self.output_kind!r}")
        if not _is_int(self.priority) or not -MAX_PRIORITY <= self.priority <= MAX_PRIORITY:
            _fail("priority", f"priority must be an integer between -{MAX_PRIORITY} and "
                              f"{MAX_PRIORITY}, got {self.priority!r}")

    def _check_logprobs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                _fail(name, f"{name} must be an integer between 0 and {MAX_LOGPROBS}, got "
                            f"{value!r}")

    def _check_sampling(self) -> None:
        if not _is_number(self.temperature) or self.temperature < 0:
            _fail("temperature", f"temperature must be >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            _fail("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            _fail("top_k", f"top_k must be -1 (disabled), 0 (disabled) or >= 1, got "
                           f"{self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            _fail("min_p", f"min_p must be in [0, 1], got {self.min_p!r}")

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                _fail(name, f"{name} must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            _fail("repetition_penalty", f"repetition_penalty must be > 0, got "
                                        f"{self.repetition_penalty!r}")

    def _check_compute(self) -> None:
        if self.halt_threshold is not None and (
                not _is_number(self.halt_threshold) or not 0 <= self.halt_threshold < 1):
            _fail("halt_threshold", f"halt_threshold must be in [0, 1), got "
                                    f"{self.halt_threshold!r}")
        if self.max_loops is not None and (not _is_int(self.max_loops) or self.max_loops < 1):
            _fail("max_loops", f"max_loops must be an integer >= 1, got {self.max_loops!r}")

    @property
    def greedy(self) -> bool:
        """Greedy below SAMPLING_EPS: 1 / temperature would overflow the logits."""
        return self.temperature < SAMPLING_EPS

    def check_against(self, config: ModelConfig) -> None:
        """Checks that need the model: max_loops <= N, token ids in the vocabulary."""
        if self.max_loops is not None and self.max_loops > config.max_loops:
            _fail("max_loops", f"max_loops must be between 1 and {config.max_loops}, got "
                               f"{self.max_loops}")
        bad = [t for t in self.stop_token_ids if t >= config.vocab_size]
        if bad:
            _fail("stop_token_ids", f"stop_token_ids must be below vocab_size "
                                    f"{config.vocab_size}, got {bad[0]}")
        bad = [t for t, _ in self.logit_bias if t >= config.vocab_size]
        if bad:
            _fail("logit_bias", f"logit_bias token ids must be below vocab_size "
                                f"{config.vocab_size}, got {bad[0]}")

    def resolved_threshold(self, config: ModelConfig) -> float:
        return config.halt_threshold if self.halt_threshold is None else float(self.halt_threshold)

    def resolved_max_loops(self, config: ModelConfig) -> int:
        return config.max_loops if self.max_loops is None else self.max_loops
