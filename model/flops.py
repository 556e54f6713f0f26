"""Analytic compute: FLOPs per token, per layer, per executed loop step, and parameter counts.

A multiply-add counts as 2 FLOPs. Per token, per executed (layer, step):

    memory   per bank: scores 2*S*D + readout 2*S*D + out proj 2*D*D + gate 2*D
    qkv      2*D*(H + 2*Hkv)*hd          attention out   2*H*hd*D
    attention over the c keys it actually sees (causal): 4*H*hd*c
    mlp      6*D*F                        router (steps t < N) 2*(D + 1)

plus the LM head, 2*D*V, for each token whose logits are computed. Norms, softmax and
element-wise work are not counted (as in the usual 6ND-style accounting).
"""

from __future__ import annotations

import torch

from model.config import ModelConfig


def memory_flops(cfg: ModelConfig) -> int:
    """Matmul FLOPs of one token's memory reads in one step (both banks)."""
    d = cfg.d_model
    total = 0
    for slots in (cfg.local_memory_slots, cfg.global_memory_slots):
        if slots:
            total += 4 * slots * d + 2 * d * d + 2 * d
    return total


def block_matmul_flops(cfg: ModelConfig, step: int) -> int:
    """Matmul FLOPs of one token at 1-based loop `step`, attention scores excluded."""
    d, hd = cfg.d_model, cfg.head_dim
    qkv = 2 * d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
    attn_out = 2 * cfg.n_heads * hd * d
    mlp = 6 * d * cfg.ffn_hidden
    router = 2 * (d + 1) if step < cfg.max_loops else 0
    return memory_flops(cfg) + qkv + attn_out + mlp + router


def attention_flops(cfg: ModelConfig, context_len: int) -> int:
    """QK^T and AV FLOPs of one query over `context_len` keys (all heads)."""
    return 4 * cfg.n_heads * cfg.head_dim * context_len


def lm_head_flops(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model * cfg.vocab_size


def layer_flops(cfg: ModelConfig, depth: int, context_len: int) -> int:
    """FLOPs of one token that ran `depth` steps of one layer at context length `context_len`."""
    return sum(block_matmul_flops(cfg, t) for t in range(1, depth + 1)) + depth * attention_flops(
        cfg, context_len)


def token_flops(cfg: ModelConfig, depths: list[int], context_len: int, with_logits: bool) -> int:
    """FLOPs of one token through every layer (`depths` [L]), plus the LM head if sampled."""
    total = sum(layer_flops(cfg, d, context_len) for d in depths)
    return total + (lm_head_flops(cfg) if with_logits else 0)


def sequence_matmul_flops(cfg: ModelConfig, num_tokens: int, loops: int | None = None) -> int:
    """Matmul FLOPs (no attention scores) of `num_tokens` tokens at full depth, with logits."""
    loops = cfg.max_loops if loops is None else loops
    per_token = cfg.n_layers * sum(block_matmul_flops(cfg, t) for t in range(1, loops + 1))
    return num_tokens * (per_token + lm_head_flops(cfg))


def causal_attention_flops(cfg: ModelConfig, seq_len: int, loops: int | None = None) -> int:
    """Attention-score FLOPs of one causal sequence at full depth: query i sees i + 1 keys."""
    loops = cfg.max_loops if loops is None else loops
    keys_seen = seq_len * (seq_len + 1) // 2
    return cfg.n_layers * loops * attention_flops(cfg, keys_seen)


def parameter_count(cfg: ModelConfig) -> int:
    """Analytic number of parameters of `LoopLM(cfg)`."""
    d, hd = cfg.d_model, cfg.head_dim
    norms = 2 * d + 2 * hd  # attn_norm, mlp_norm, q_norm, k_norm
    attention = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * hd + cfg.n_heads * hd * d
    loop_and_router = cfg.max_loops + (d + 1) + 1  # alpha_t, router weight and bias
    per_layer = norms + attention + 3 * d * cfg.ffn_hidden + loop_and_router
    if cfg.has_memory:
        per_layer += d  # memory norm
        read = d + d * d + d + 1  # norm_q, out, gate weight + bias
        if cfg.local_memory_slots:
            per_layer += 2 * cfg.local_memory_slots * d + d + read
        if cfg.global_memory_slots:
            per_layer += read
    total = cfg.n_layers * per_layer + 2 * cfg.vocab_size * d + d  # embed, lm_head, final norm
    if cfg.global_memory_slots:
        total += 2 * cfg.global_memory_slots * d + d
    return total


class FlopTable:
    """Vectorised per-token FLOPs for the engine: precomputed per loop depth."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        cumulative = [0]
        for step in range(1, cfg.max_loops + 1):
            cumulative.append(cumulative[-1] + block_matmul_flops(cfg, step))
        self.cumulative_matmul = torch.tensor(cumulative, dtype=torch.float64)  # [N + 1]
        self.per_key = float(attention_flops(cfg, 1))
        self.head = float(lm_head_flops(cfg))
        self.max_depth_matmul = float(cumulative[-1]) * cfg.n_layers  # per token at depth N

    def trunk(self, depths: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """FLOPs of tokens that ran depths [n, L] at positions [n] (context = position + 1)."""
        matmul = self.cumulative_matmul[depths].sum(-1)  # [n]
        keys = (positions.double() + 1) * depths.sum(-1).double()
        return matmul + self.per_key * keys

    def trunk_max_depth(self, positions: torch.Tensor) -> torch.Tensor:
        """FLOPs the same tokens would cost at full depth N in every layer."""
        cfg = self.cfg
        keys = (positions.double() + 1) * cfg.n_layers * cfg.max_loops
        return self.max_depth_matmul + self.per_key * keys
