"""Gated memory banks: learned key/value slots every loop step reads densely.

A layer reads its own *local* bank and the model's shared *global* bank:

    x <- x + sig(Wg_loc x + bg_loc) * W_loc mem(x; K_l, V_l)
           + sig(Wg_glob x + bg_glob) * W_glob mem(x; K_G, V_G)
    mem(x; K, V) = softmax(q k^T / sqrt(D)) V,  q = norm_q(norm_mem(x)),  k = norm_k(K)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import ModelConfig
from model.layers import RMSNorm

LOCAL, GLOBAL = 0, 1  # column of each bank in gate tensors [..., 2]


class MemoryBank(nn.Module):
    """`slots` learned keys and values of width d_model, keys RMS-normed before use."""

    def __init__(self, slots: int, cfg: ModelConfig) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.randn(slots, cfg.d_model) * 0.02)
        self.values = nn.Parameter(torch.randn(slots, cfg.d_model) * 0.02)
        self.norm_k = RMSNorm(cfg.d_model, cfg.norm_eps)
        self._scaled_keys: tuple[tuple, torch.Tensor] | None = None

    def scaled_keys_t(self) -> torch.Tensor:
        """norm_k(K)^T / sqrt(D) [D, S]. Constant while serving, so it is cached and rebuilt
        only when the key or norm parameters change (their version counters move)."""
        stamp = (self.keys._version, self.norm_k.weight._version, self.keys.data_ptr(),
                 self.keys.dtype, self.keys.device)
        if torch.is_grad_enabled() or self._scaled_keys is None or self._scaled_keys[0] != stamp:
            keys_t = self.norm_k(self.keys).t() / math.sqrt(self.keys.shape[-1])
            if torch.is_grad_enabled():
                return keys_t
            self._scaled_keys = (stamp, keys_t.contiguous())
        return self._scaled_keys[1]

    def read(self, q: torch.Tensor) -> torch.Tensor:
        """Dense softmax read: q [..., D] -> [..., D]."""
        scores = q @ self.scaled_keys_t()  # [..., S]
        return scores.softmax(dim=-1) @ self.values  # [..., D]


class GatedRead(nn.Module):
    """One bank's query norm, output projection and scalar sigmoid gate, for one layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm_q = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.gate = nn.Linear(cfg.d_model, 1, bias=True)

    def forward(self, x: torch.Tensor, x_normed: torch.Tensor, bank: MemoryBank
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, x_normed: [..., D] -> (gated readout [..., D], gate [...])."""
        gate = torch.sigmoid(self.gate(x)).squeeze(-1)
        return gate.unsqueeze(-1) * self.out(bank.read(self.norm_q(x_normed))), gate


class LayerMemory(nn.Module):
    """A layer's memory path: its local bank (optional) and its read of the global bank."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        has_local = cfg.local_memory_slots > 0
        self.local_bank = MemoryBank(cfg.local_memory_slots, cfg) if has_local else None
        self.local_read = GatedRead(cfg) if has_local else None
        self.global_read = GatedRead(cfg) if cfg.global_memory_slots else None

    def forward(self, x: torch.Tensor, global_bank: MemoryBank | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., D] -> (x plus the gated readouts [..., D], gates [..., 2] (0 where no bank))."""
        x_normed = self.norm(x)
        gates = x.new_zeros(*x.shape[:-1], 2, dtype=torch.float32)
        update = torch.zeros_like(x)
        if self.local_read is not None:
            readout, gates[..., LOCAL] = self.local_read(x, x_normed, self.local_bank)
            update = update + readout
        if self.global_read is not None:
            readout, gates[..., GLOBAL] = self.global_read(x, x_normed, global_bank)
            update = update + readout
        return x + update, gates
