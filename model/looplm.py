"""`LoopLM`: the looped transformer with memory, its reference forward and training loss.

`reference_forward` is the plain, uncached, whole-sequence implementation of both
semantics of DESIGN section 2 (exact and adaptive with the KV rule for halted tokens).
Every optimised path in the engine is tested against it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from model.block import LoopBlock
from model.config import ModelConfig
from model.errors import InvalidRequestError
from model.layers import RMSNorm, Rotary
from model.memory import MemoryBank


@dataclasses.dataclass
class ForwardOutput:
    """What a whole-sequence forward returns (B sequences of T tokens, L layers)."""

    logits: torch.Tensor  # [B, T, V]
    depths: torch.Tensor  # [B, T, L] int: loop steps each token ran in each layer
    memory_gates: torch.Tensor  # [B, T, L, 2] mean gate (local, global) over executed steps
    expected_steps: torch.Tensor  # [B, T, L] sum_t t * p_t (differentiable; ponder cost)
    loss: torch.Tensor | None = None  # mean next-token cross-entropy (+ ponder penalty)
    ponder: torch.Tensor | None = None  # (mean expected steps - 1) / (N - 1)


@dataclasses.dataclass
class LayerResult:
    out: torch.Tensor  # [B, T, D] the layer's output
    depth: torch.Tensor  # [B, T] int
    gates: torch.Tensor  # [B, T, 2] mean over executed steps
    expected_steps: torch.Tensor  # [B, T]


def check_loop_overrides(cfg: ModelConfig, halt_threshold: float | None, max_loops: int | None
                         ) -> int:
    """Validate the per-request compute knobs; returns the effective max_loops."""
    if halt_threshold is not None and not 0.0 <= halt_threshold < 1.0:
        raise InvalidRequestError(
            f"halt_threshold must be in [0, 1), got {halt_threshold}", param="halt_threshold")
    if max_loops is None:
        return cfg.max_loops
    if isinstance(max_loops, bool) or not isinstance(max_loops, int) or not (
            1 <= max_loops <= cfg.max_loops):
        raise InvalidRequestError(
            f"max_loops must be an integer between 1 and {cfg.max_loops}, got {max_loops}",
            param="max_loops")
    return max_loops


class LoopLM(nn.Module):
    """Decoder-only looped transformer: embed -> L looped layers -> RMSNorm -> LM head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.global_bank = (MemoryBank(config.global_memory_slots, config)
                            if config.global_memory_slots else None)
        self.layers = nn.ModuleList(LoopBlock(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.rotary = Rotary(config.head_dim, config.max_position, config.rope_base)
        self._init_weights()

    def _init_weights(self) -> None:
        cfg = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=1.0)
        for block in self.layers:
            nn.init.constant_(block.router.bias, cfg.router_bias_init)
            if block.memory is not None:
                for read in (block.memory.local_read, block.memory.global_read):
                    if read is not None:
                        nn.init.constant_(read.gate.bias, cfg.gate_bias_init)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: hidden [..., D] -> logits [..., V] in fp32."""
        return self.lm_head(self.final_norm(hidden)).float()

    # ------------------------------------------------------------------ reference
    @torch.no_grad()
    def reference_forward(self, input_ids: torch.Tensor, halt_threshold: float | None = None,
                          max_loops: int | None = None) -> ForwardOutput:
        """Whole-sequence forward. halt_threshold=None: exact semantics; a float: adaptive."""
        return self._forward(input_ids, halt_threshold, max_loops)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                halt_threshold: float | None = None, ponder_weight: float = 0.0,
                ignore_index: int = -100) -> ForwardOutput:
        """Training forward: logits, and with `targets` [B, T] the loss
        cross-entropy + ponder_weight * (mean expected steps - 1) / (N - 1)."""
        result = self._forward(input_ids, halt_threshold, None)
        if targets is None:
            return result
        ce = F.cross_entropy(result.logits.flatten(0, 1), targets.flatten(),
                             ignore_index=ignore_index)
        n = self.config.max_loops
        counted = (targets != ignore_index).unsqueeze(-1).expand_as(result.expected_steps)
        mean_steps = result.expected_steps[counted].mean() if counted.any() else ce.new_zeros(())
        result.ponder = (mean_steps - 1) / (n - 1) if n > 1 else mean_steps * 0
        result.loss = ce + ponder_weight * result.ponder
        return result

    def _forward(self, input_ids: torch.Tensor, halt_threshold: float | None,
                 max_loops: int | None) -> ForwardOutput:
        loops = check_loop_overrides(self.config, halt_threshold, max_loops)
        self._check_input(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = self.rotary.tables(positions)  # [T, 1, hd/2]
        h = self.embed(input_ids)  # [B, T, D]
        per_layer = []
        for block in self.layers:
            result = self._layer_reference(block, h, cos, sin, halt_threshold, loops)
            h = result.out
            per_layer.append(result)
        return ForwardOutput(
            logits=self.logits(h),
            depths=torch.stack([r.depth for r in per_layer], dim=-1),
            memory_gates=torch.stack([r.gates for r in per_layer], dim=-2),
            expected_steps=torch.stack([r.expected_steps for r in per_layer], dim=-1))

    def _check_input(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise InvalidRequestError(f"input_ids must be [B, T] with T >= 1, got "
                                      f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position:
            raise InvalidRequestError(f"sequence length {input_ids.shape[1]} exceeds "
                                      f"max_position {self.config.max_position}")

    def _layer_reference(self, block: LoopBlock, h: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, eps: float | None, loops: int) -> LayerResult:
        """Run one layer over whole sequences h [B, T, D] (see DESIGN section 2)."""
        batch, seq = h.shape[:2]
        remaining = h.new_ones(batch, seq, dtype=torch.float32)  # R
        out = torch.zeros_like(h, dtype=torch.float32)
        active = torch.ones(batch, seq, dtype=torch.bool, device=h.device)
        depth = torch.zeros(batch, seq, dtype=torch.long, device=h.device)
        gate_sum = h.new_zeros(batch, seq, 2, dtype=torch.float32)
        expected = h.new_zeros(batch, seq, dtype=torch.float32)
        state, k_last, v_last = h, None, None
        for step in range(1, loops + 1):
            x, gates = block.read_memory(state, self.global_bank)
            q, k, v = block.project_qkv(x, cos, sin)  # q [B,T,H,hd], k/v [B,T,Hkv,hd]
            if k_last is not None:  # KV rule: halted tokens keep the k/v of their last step
                keep = ~active[..., None, None]
                k, v = torch.where(keep, k_last, k), torch.where(keep, v_last, v)
            attn = causal_attention(q, k, v)  # [B, T, H * hd]
            h_step = block.finish_step(x, attn, step)
            lam = block.halt_probability(h_step, step)
            p = lam * remaining
            live = active.float()
            out = out + (live * p).unsqueeze(-1) * h_step.float()
            expected = expected + live * p * step
            remaining = torch.where(active, remaining - p, remaining)
            gate_sum = gate_sum + live.unsqueeze(-1) * gates
            depth = depth + active.long()
            halted = active & (remaining < eps) if eps is not None else torch.zeros_like(active)
            if step == loops:
                halted = active
            # leftover mass goes to the halted token's last state
            leftover = (halted.float() * remaining)
            out = out + leftover.unsqueeze(-1) * h_step.float()
            expected = expected + leftover * step
            state = torch.where(active.unsqueeze(-1), h_step, state)
            k_last, v_last = k, v
            active = active & ~halted
        return LayerResult(out=out.to(h.dtype), depth=depth,
                           gates=gate_sum / depth.unsqueeze(-1), expected_steps=expected)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention over whole sequences: q [B,T,H,hd], k/v [B,T,Hkv,hd] -> [B,T,H*hd]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=True)  # [B, H, T, hd]
    return out.transpose(1, 2).flatten(2)
