"""`ServingBlock`: one layer's weights rearranged once for serving, so that a loop step
launches fewer kernels. The arithmetic is `LoopBlock`'s, re-associated:

- RMSNorm weights before a linear are folded into it: norm(x) W^T = rms(x) (W diag(g))^T;
- the two memory banks read in one pass: one gate matmul for both banks, the query norms
  folded into the bank keys (q k^T = rms(x_n) diag(w_q) K^T), one score matmul over the
  concatenated slots, and the value and output projections folded together
  (g P V W^T = [g_l P_l, g_g P_g] [V_l W_l^T; V_g W_g^T]): one readout matmul;
- q and k head norms share one call with weights concatenated once;
- RoPE is one complex multiply: the q and k rows of the qkv weight are reordered once so
  that each head holds its rotate-half pairs (x_j, x_{j+hd/2}) side by side, as complex
  numbers x_j + i x_{j+hd/2}; rotating is then `x * e^{i theta}` with a per-step table
  [T, 1, hd/2] complex64 built once per engine step (fp32, also in a bf16 model). q k^T,
  the head norms and the KV pool are indifferent to the order (q and k share it; v keeps
  its own), so attention sees exactly what the reference computes;
- the rotated q and k are written back into the qkv projection's output, where k sits
  next to v: a step's k/v [T, 2, Hkv, hd] is a view, not a stacked copy;
- the loop scales s_t = softplus(alpha_t) and the router's step feature become constants;
- its RMS norms are `RowNorm`s: one fused kernel on a GPU, a cheaper composition on a CPU
  (`engine/row_norm.py`);
- every residual add rides on its matmul (`addmm(x, a, W^T, alpha=s_t)`: one kernel, not two),
  as do the memory update and the router's per-step bias.

The reference forward keeps using `LoopBlock`; tests hold the engine to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.row_norm import RowNorm
from model.block import LoopBlock
from model.memory import MemoryBank


def rope_table(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[T, 1, hd/2] cos and sin tables -> e^{i theta} [T, 1, hd/2] complex64."""
    return torch.complex(cos.float(), sin.float())


def pair_order(head_dim: int) -> torch.Tensor:
    """[hd]: new position 2j holds old j, 2j + 1 holds old j + hd/2 (rotate-half pairs)."""
    half = head_dim // 2
    return torch.stack((torch.arange(half), torch.arange(half, head_dim)), dim=-1).flatten()


def _qkv_rows(heads: int, head_dim: int, v_dim: int, order: torch.Tensor) -> torch.Tensor:
    """Rows of the qkv weight in serving order: each q and k head in pair order, v as is."""
    qk = torch.arange(heads, device=order.device)[:, None] * head_dim + order  # [heads, hd]
    v = torch.arange(heads * head_dim, heads * head_dim + v_dim, device=order.device)
    return torch.cat((qk.flatten(), v))


class ServingBlock:
    """Inference-only view of a `LoopBlock` (the weights are copies, made once)."""

    @torch.no_grad()
    def __init__(self, block: LoopBlock, global_bank: MemoryBank | None) -> None:
        cfg = block.cfg
        self.cfg = cfg
        self.eps = cfg.norm_eps
        dtype = block.qkv.weight.dtype
        self.norm = RowNorm.for_device(cfg.norm_eps, block.qkv.weight.device, dtype)
        self.hidden = cfg.ffn_hidden  # the MLP width (the fused chains split by it)
        order = pair_order(cfg.head_dim).to(block.qkv.weight.device)
        rows = _qkv_rows(cfg.n_heads + cfg.n_kv_heads, cfg.head_dim, cfg.kv_dim, order)
        self.qkv_weight = (block.qkv.weight * block.attn_norm.weight)[rows].to(dtype)
        self.qk_norm = torch.cat((block.q_norm.weight.expand(cfg.n_heads, -1),
                                  block.k_norm.weight.expand(cfg.n_kv_heads, -1)))[:, order]
        self.qk_norm = self.qk_norm.float().contiguous()  # [heads, hd] in pair order
        self.attn_out_t = block.attn_out.weight.t()  # [H * hd, D], for addmm
        self.gate_up = (block.mlp.gate_up.weight * block.mlp_norm.weight).to(dtype)
        self.down_t = block.mlp.down.weight.t()  # [F, D]
        self.scales = [float(F.softplus(a)) for a in block.loop_scale.float()]  # s_t
        self._router(block)
        self._memory(block, global_bank)

    def _router(self, block: LoopBlock) -> None:
        n = self.cfg.max_loops
        weight = block.router.weight[0].float()  # [D + 1]
        self.router_weight = weight[:-1].unsqueeze(-1)  # [D, 1]
        bias = float(block.router.bias[0])
        feature = [(t - 1) / (n - 1) if n > 1 else 0.0 for t in range(1, n + 1)]
        self.router_bias = [torch.tensor([bias + f * float(weight[-1])], device=weight.device)
                            for f in feature]  # per step, [1] fp32 (the addmm's input)

    def _memory(self, block: LoopBlock, global_bank: MemoryBank | None) -> None:
        memory = block.memory
        self.has_memory = memory is not None
        if memory is None:
            return
        reads = [(memory.local_read, memory.local_bank), (memory.global_read, global_bank)]
        self.bank_columns = [i for i, (read, _) in enumerate(reads) if read is not None]
        self.bank_index = torch.tensor(self.bank_columns, device=memory.norm.weight.device)
        present = [(read, bank) for read, bank in reads if read is not None]
        dtype = memory.norm.weight.dtype
        self.memory_norm = memory.norm.weight
        self.gate_weight = torch.cat([read.gate.weight for read, _ in present])  # [banks, D]
        self.gate_bias = torch.cat([read.gate.bias for read, _ in present])  # [banks]
        width = block.cfg.d_model
        keys = [bank.norm_k(bank.keys) * read.norm_q.weight / math.sqrt(width)
                for read, bank in present]  # [S_b, D] each, query norm folded in
        self.keys_t = torch.cat(keys).t().contiguous().to(dtype)  # [D, S]
        values = [bank.values @ read.out.weight.t() for read, bank in present]  # [S_b, D]
        self.values = torch.cat(values).contiguous().to(dtype)  # [S, D]
        self.slots = [bank.keys.shape[0] for _, bank in present]

    # ------------------------------------------------------------------ one loop step
    def read_memory(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, D] -> (x [T, D], gates [T, 2]), as `LoopBlock.read_memory`; the gates stay
        in the model dtype where both banks are read (the fp32 sums they go into promote
        them, so a bf16 model pays no cast kernel)."""
        if not self.has_memory:
            return h, h.new_zeros(h.shape[0], 2, dtype=torch.float32)
        normed = self.norm(h, self.memory_norm)
        gate = torch.sigmoid(F.linear(h, self.gate_weight, self.gate_bias))  # [T, banks]
        query = self.norm(normed)
        scores = query @ self.keys_t  # [T, S]
        weights = torch.empty_like(scores)  # [T, S]: each bank's gated softmax, in place
        # split_with_sizes, not Tensor.split: that one's Python wrapper costs us a call
        for b, (p, w) in enumerate(zip(scores.split_with_sizes(self.slots, dim=-1),
                                       weights.split_with_sizes(self.slots, dim=-1),
                                       strict=True)):
            torch.mul(p.softmax(dim=-1), gate[:, b:b + 1], out=w)  # no concatenation
        gates = gate if len(self.bank_columns) == 2 else (
            gate.new_zeros(h.shape[0], 2, dtype=torch.float32).index_copy_(
                1, self.bank_index, gate.float()))
        return torch.addmm(h, weights, self.values), gates  # h + update, one kernel

    def project_qkv(self, x: torch.Tensor, rope: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D], rope [T, 1, hd/2] from `rope_table` -> q [T, H, hd] and this step's
        k/v [T, 2, Hkv, hd] (q and k in pair order). Both are views of the projection's
        own output: the normed, rotated q and k are written back over their raw values,
        and k sits next to v there, so k/v need no stacking copy."""
        cfg = self.cfg
        heads, hd = cfg.n_heads + cfg.n_kv_heads, cfg.head_dim
        qkv = F.linear(self.norm(x), self.qkv_weight)
        qk = qkv[:, :heads * hd].unflatten(-1, (heads, hd))  # [T, heads, hd] view
        # [T, heads, hd] fp32: rms_norm computes in fp32 whatever its input (a bf16 model
        # gets the norm rounded to bf16 before the weight; the reference rounds after it)
        normed = self.norm(qk) * self.qk_norm
        pairs = torch.view_as_complex(normed.unflatten(-1, (hd // 2, 2)))
        if qk.dtype == torch.float32:  # rotate straight into place: one kernel
            torch.mul(pairs, rope, out=torch.view_as_complex(qk.unflatten(-1, (hd // 2, 2))))
        else:  # rotate in fp32, then cast into place
            qk.copy_(torch.view_as_real(pairs * rope).flatten(-2))
        kv = qkv[:, cfg.n_heads * hd:].unflatten(-1, (2, cfg.n_kv_heads, hd))
        return qk[:, :cfg.n_heads], kv

    def finish_step(self, x: torch.Tensor, attn: torch.Tensor, step: int) -> torch.Tensor:
        """x [T, D], attention output [T, H * hd] -> h_t [T, D]."""
        scale = self.scales[step - 1]
        u = torch.addmm(x, attn, self.attn_out_t, alpha=scale)  # x + s_t attn W_o^T
        gate, up = F.linear(self.norm(u), self.gate_up).chunk(2, dim=-1)  # [T, F] each
        return torch.addmm(u, F.silu(gate) * up, self.down_t, alpha=scale)

    def halt_probability(self, h: torch.Tensor, step: int) -> torch.Tensor | None:
        """lam_t [T] fp32; None at the model's last step N (where it is exactly 1)."""
        if step == self.cfg.max_loops:
            return None
        logit = torch.addmm(self.router_bias[step - 1], h.float(), self.router_weight)  # [T, 1]
        return torch.sigmoid(logit).squeeze(-1)
