"""ModelRunner: owns the device and the KV pool; runs the dynamic-depth forward of a step.

Layer by layer (DESIGN section 4):

    active = every token of the step ; R = 1 ; out = 0
    for t = 1..N:
        gather active -> memory read -> qkv -> write k, v into plane t
        attention of active queries over their sequence's plane t
        MLP -> router -> p_t, R_t ; out += p_t * h_t
        halted = R_t < eps (of its request) or t == max_loops (of its request)
        halted: out += R_t * h_t ; copy their plane-t k/v into planes t+1..N
        active = active without halted        # the next step's batch is smaller

Each (layer, step) is one batched call over exactly the tokens, from every request, that
still loop there: the cost follows the loops spent. `max_depth=True` runs every token for
N steps (what an engine without halting does), for side-by-side measurement.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.block import LoopBlock
from engine.model import LoopLM
from engine.paged_attention import AttentionPlan


@dataclasses.dataclass(frozen=True)
class StepInput:
    """One engine step, packed flat. Sequences are in flat order, one-token ones first."""

    token_ids: list[int]  # [T]
    positions: list[int]  # [T]
    block_tables: list[list[int]]  # per sequence
    starts: list[int]  # per sequence: position of its first token this step
    lengths: list[int]  # per sequence: tokens this step
    halt_thresholds: list[float]  # per sequence
    max_loops: list[int]  # per sequence
    sample_rows: list[int]  # flat token indices whose logits are needed
    num_decodes: int  # leading sequences with one token


@dataclasses.dataclass
class StepOutput:
    logits: torch.Tensor  # [S, V] fp32, rows as in StepInput.sample_rows
    depths: torch.Tensor  # [T, L] long on CPU
    gates: torch.Tensor  # [T, L, 2] fp32 on CPU: mean over executed steps
    active_per_call: list[tuple[int, int, int]]  # (layer, step, active tokens) per call


@dataclasses.dataclass
class LayerState:
    """Bookkeeping of one layer's loop over the step's tokens."""

    out: torch.Tensor  # [T, D] fp32 ACT mixture
    remaining: torch.Tensor  # [T] fp32, R
    depth: torch.Tensor  # [T] long
    gate_sum: torch.Tensor  # [T, 2] fp32


class ModelRunner:
    def __init__(self, model: LoopLM, num_blocks: int, block_size: int,
                 max_depth: bool = False) -> None:
        self.model = model
        self.config = model.config
        self.block_size = block_size
        self.max_depth = max_depth
        cfg = self.config
        shape = (num_blocks, cfg.max_loops, 2, block_size, cfg.n_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=model.dtype, device=model.device)
                          for _ in range(cfg.n_layers)]

    @staticmethod
    def kv_bytes_per_token(model: LoopLM) -> int:
        cfg = model.config
        element = torch.empty((), dtype=model.dtype).element_size()
        return cfg.n_layers * cfg.max_loops * 2 * cfg.n_kv_heads * cfg.head_dim * element

    @torch.inference_mode()
    def run(self, step: StepInput) -> StepOutput:
        device = self.model.device
        positions = torch.tensor(step.positions, dtype=torch.long, device=device)
        plan = AttentionPlan.build(step.block_tables, step.starts, step.lengths,
                                   step.num_decodes, self.block_size, positions)
        slots = self._write_slots(step, positions)
        eps, loops = self._per_token_limits(step, device)
        cos, sin = self.model.rotary.tables(positions)  # [T, 1, hd/2]
        h = self.model.embed(torch.tensor(step.token_ids, dtype=torch.long, device=device))
        depths, gates, calls = [], [], []
        for index, block in enumerate(self.model.layers):
            state = self._run_layer(index, block, h, plan, slots, eps, loops, cos, sin, calls)
            h = state.out.to(h.dtype)
            depths.append(state.depth)
            gates.append(state.gate_sum / state.depth.unsqueeze(-1))
        rows = torch.tensor(step.sample_rows, dtype=torch.long, device=device)
        return StepOutput(logits=self.model.logits(h[rows]),
                          depths=torch.stack(depths, dim=-1).cpu(),
                          gates=torch.stack(gates, dim=-2).float().cpu(),
                          active_per_call=calls)

    def _write_slots(self, step: StepInput, positions: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block id and offset [T] where each token's k/v are written."""
        block_of_token = [table[p // self.block_size]
                          for table, start, length in zip(step.block_tables, step.starts,
                                                          step.lengths, strict=True)
                          for p in range(start, start + length)]
        block_ids = torch.tensor(block_of_token, dtype=torch.long, device=positions.device)
        return block_ids, positions % self.block_size

    def _per_token_limits(self, step: StepInput, device: torch.device
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Halting threshold and max loops [T] of each token's request."""
        n = self.config.max_loops
        if self.max_depth:
            total = len(step.token_ids)
            return (torch.full((total,), -1.0, device=device),
                    torch.full((total,), n, dtype=torch.long, device=device))
        lengths = torch.tensor(step.lengths, device=device)
        eps = torch.tensor(step.halt_thresholds, dtype=torch.float32, device=device)
        loops = torch.tensor(step.max_loops, dtype=torch.long, device=device)
        return eps.repeat_interleave(lengths), loops.repeat_interleave(lengths)

    def _run_layer(self, index: int, block: LoopBlock, h: torch.Tensor, plan: AttentionPlan,
                   slots: tuple[torch.Tensor, torch.Tensor], eps: torch.Tensor,
                   loops: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   calls: list[tuple[int, int, int]]) -> LayerState:
        total = h.shape[0]
        cache = self.kv_caches[index]
        layer = LayerState(out=torch.zeros(total, h.shape[1], dtype=torch.float32,
                                           device=h.device),
                           remaining=torch.ones(total, dtype=torch.float32, device=h.device),
                           depth=torch.zeros(total, dtype=torch.long, device=h.device),
                           gate_sum=torch.zeros(total, 2, dtype=torch.float32, device=h.device))
        active = torch.arange(total, device=h.device)  # [A] flat token ids still looping
        state = h  # [A, D]
        for step in range(1, self.config.max_loops + 1):
            calls.append((index, step, active.numel()))
            x, gates = block.read_memory(state, self.model.global_bank)
            q, k, v = block.project_qkv(x, cos[active], sin[active])
            blocks, offsets = slots[0][active], slots[1][active]
            kv = torch.stack((k, v), dim=1)  # [A, 2, Hkv, hd]
            cache[blocks, step - 1, :, offsets] = kv
            h_step = block.finish_step(x, plan.attend(cache, step - 1, active, q), step)
            halted = self._mix(layer, block, active, h_step, gates, step, eps, loops)
            if not bool(halted.any()):
                state = h_step
                continue
            self._copy_halted_kv(cache, blocks[halted], offsets[halted], kv[halted], step)
            keep = ~halted
            active, state = active[keep], h_step[keep]
            if active.numel() == 0:
                break
        return layer

    def _mix(self, layer: LayerState, block: LoopBlock, active: torch.Tensor,
             h_step: torch.Tensor, gates: torch.Tensor, step: int, eps: torch.Tensor,
             loops: torch.Tensor) -> torch.Tensor:
        """ACT update of the active tokens; returns which of them halt at this step [A]."""
        lam = block.halt_probability(h_step, step)  # [A]
        remaining = layer.remaining[active]
        p = lam * remaining
        remaining = remaining - p
        halted = (remaining < eps[active]) | (loops[active] <= step)
        weight = p + torch.where(halted, remaining, torch.zeros_like(remaining))
        layer.out[active] += weight.unsqueeze(-1) * h_step.float()
        layer.remaining[active] = remaining
        layer.depth[active] += 1
        layer.gate_sum[active] += gates
        return halted

    def _copy_halted_kv(self, cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
                        kv: torch.Tensor, step: int) -> None:
        """KV rule: a token halted at `step` shows its step-`step` k/v [h, 2, Hkv, hd] at
        every later step (0-based planes step..N-1), written in one indexed copy."""
        later = self.config.max_loops - step
        if later <= 0:
            return
        planes = torch.arange(step, self.config.max_loops, device=kv.device)
        cache[blocks.repeat(later), planes.repeat_interleave(blocks.numel()), :,
              offsets.repeat(later)] = kv.repeat(later, 1, 1, 1)
