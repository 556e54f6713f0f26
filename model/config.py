"""`ModelConfig`: the looped model's hyper-parameters, validated when built, kept in config.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from model.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every number that fixes the shape and default behaviour of a `LoopLM`.

    ``max_loops = 1`` with no memory slots is a plain pre-norm transformer.
    """

    vocab_size: int = 264
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    ffn_hidden: int = 128
    max_loops: int = 3
    local_memory_slots: int = 8
    global_memory_slots: int = 16
    gate_bias_init: float = -2.0
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    max_position: int = 256
    halt_threshold: float = 0.1
    loop_scale_init: float = -7.0
    router_bias_init: float = 0.0
    # tokenizer fields
    tokenizer: str = "byte"
    bos_token_id: int = 257
    eos_token_id: int = 258
    pad_token_id: int = 256

    def __post_init__(self) -> None:
        self._check_positive()
        self._check_heads()
        self._check_ranges()

    def _check_positive(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_hidden", "max_position"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("local_memory_slots", "global_memory_slots"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0 (0 = no memory), got {value!r}")
        if not isinstance(self.max_loops, int) or self.max_loops < 1:
            raise ConfigError(f"max_loops must be an integer >= 1, got {self.max_loops!r}")

    def _check_heads(self) -> None:
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_kv_heads must divide n_heads (grouped-query attention), got n_heads="
                f"{self.n_heads}, n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.n_heads * self.head_dim != self.d_model:
            raise ConfigError(
                f"n_heads * head_dim must equal d_model, got {self.n_heads} * {self.head_dim} "
                f"= {self.n_heads * self.head_dim} != {self.d_model}")

    def _check_ranges(self) -> None:
        if not 0.0 <= self.halt_threshold < 1.0:
            raise ConfigError(f"halt_threshold must be in [0, 1), got {self.halt_threshold}")
        if self.rope_base <= 1.0:
            raise ConfigError(f"rope_base must be > 1, got {self.rope_base}")
        if self.norm_eps <= 0.0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"{name} must be in [0, vocab_size={self.vocab_size}), got {value}")

    @property
    def has_memory(self) -> bool:
        return self.local_memory_slots > 0 or self.global_memory_slots > 0

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read model config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"model config {path} must hold a JSON object")
        return cls.from_dict(data)
