"""`LoopBlock`: one layer's weights and the pieces of one loop step, shape-agnostic.

A loop step at step t (1-based) on hidden state h:

    x   = memory(h)                         # gated local + global memory reads
    u   = x + s_t * Attn(norm(x))           # s_t = softplus(alpha_t)
    h_t = u + s_t * MLP(norm(u))
    lam_t = sig(w . [h_t ; (t-1)/(N-1)] + b)   (lam_N = 1)

The pieces are exposed separately (`read_memory`, `project_qkv`, `finish_step`,
`halt_probability`) so that the whole-sequence reference forward and the engine's paged,
regrouped forward run exactly the same arithmetic; only attention differs between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers import RMSNorm, SwiGLU, apply_rotary, rms_norm_heads
from model.memory import LayerMemory, MemoryBank


class LoopBlock(nn.Module):
    """Weights of one looped layer; every method works on any leading shape [...]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.memory = LayerMemory(cfg) if cfg.has_memory else None
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.qkv = nn.Linear(cfg.d_model, cfg.q_dim + 2 * cfg.kv_dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.attn_out = nn.Linear(cfg.q_dim, cfg.d_model, bias=False)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        # alpha_{l,t}: one learned residual scale per loop step, s_t = softplus(alpha_t)
        self.loop_scale = nn.Parameter(torch.full((cfg.max_loops,), cfg.loop_scale_init))
        # router over [h_t ; step feature]: weight [1, d_model + 1], bias [1]
        self.router = nn.Linear(cfg.d_model + 1, 1, bias=True)

    def read_memory(self, h: torch.Tensor, global_bank: MemoryBank | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [..., D] -> (x [..., D], gates [..., 2]); identity with zero gates without memory."""
        if self.memory is None:
            return h, h.new_zeros(*h.shape[:-1], 2, dtype=torch.float32)
        return self.memory(h, global_bank)

    def project_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., D] -> q [..., H, hd], k, v [..., Hkv, hd]; q and k normed and rotated."""
        cfg = self.cfg
        heads = cfg.n_heads + cfg.n_kv_heads
        qkv = self.qkv(self.attn_norm(x))  # [..., (H + 2 Hkv) * hd]
        qk = qkv[..., :heads * cfg.head_dim].unflatten(-1, (heads, cfg.head_dim))
        v = qkv[..., heads * cfg.head_dim:].unflatten(-1, (cfg.n_kv_heads, cfg.head_dim))
        # q and k heads side by side: one norm (each with its own weight), one rotation
        weight = torch.cat((self.q_norm.weight.expand(cfg.n_heads, -1),
                            self.k_norm.weight.expand(cfg.n_kv_heads, -1)))  # [heads, hd]
        qk = apply_rotary(rms_norm_heads(qk, weight, cfg.norm_eps), cos, sin)
        return qk[..., :cfg.n_heads, :], qk[..., cfg.n_heads:, :], v

    def step_scale(self, step: int) -> torch.Tensor:
        """s_t = softplus(alpha_t) for 1-based `step` (a 0-d tensor)."""
        return F.softplus(self.loop_scale[step - 1])

    def finish_step(self, x: torch.Tensor, attn: torch.Tensor, step: int) -> torch.Tensor:
        """x [..., D], attention output attn [..., H * hd] -> h_t [..., D]."""
        scale = self.step_scale(step).to(x.dtype)
        u = x + scale * self.attn_out(attn)
        return u + scale * self.mlp(self.mlp_norm(u))

    def halt_probability(self, h: torch.Tensor, step: int) -> torch.Tensor:
        """lam_t [...] in fp32 for h_t [..., D]; exactly 1 at the model's last step N."""
        n = self.cfg.max_loops
        if step == n:
            return torch.ones(h.shape[:-1], dtype=torch.float32, device=h.device)
        feature = (step - 1) / (n - 1)
        weight = self.router.weight[0]  # [D + 1]
        logit = h.float() @ weight[:-1].float() + feature * weight[-1].float()
        return torch.sigmoid(logit + self.router.bias[0].float())
