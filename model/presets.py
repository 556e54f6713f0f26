"""Named model configurations: `tiny` for tests, and the paper's two 12-layer-scale models."""

from __future__ import annotations

from model.config import ModelConfig
from model.errors import ConfigError

PRESETS: dict[str, ModelConfig] = {
    # a few hundred thousand parameters: fast CPU tests
    "tiny": ModelConfig(),
    # the paper's Loop-3 + memory model: 12 layers, d=768, 12 query and 12 kv heads of 64,
    # SwiGLU 2048, 3 loops, 1,024 local slots per layer and 512 shared global slots
    "paper-loop3-mem": ModelConfig(
        vocab_size=50304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, head_dim=64,
        ffn_hidden=2048, max_loops=3, local_memory_slots=1024, global_memory_slots=512,
        max_position=4096, tokenizer="hf", bos_token_id=50256, eos_token_id=50256,
        pad_token_id=50256),
    # its iso-FLOP baseline: 3x the layers, no loops, no memory
    "paper-iso-flop-baseline": ModelConfig(
        vocab_size=50304, d_model=768, n_layers=36, n_heads=12, n_kv_heads=12, head_dim=64,
        ffn_hidden=2048, max_loops=1, local_memory_slots=0, global_memory_slots=0,
        max_position=4096, tokenizer="hf", bos_token_id=50256, eos_token_id=50256,
        pad_token_id=50256),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]
