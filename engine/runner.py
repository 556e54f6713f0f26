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

from engine.block_manager import BlockCopy
from engine.paged_attention import AttentionPlan
from model.block import LoopBlock
from model.looplm import LoopLM


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
class ActiveTokens:
    """The tokens still looping in a layer, compacted: row i is flat token `ids[i]`."""

    ids: torch.Tensor  # [A] flat token index
    state: torch.Tensor  # [A, D] h_{t-1}
    mixture: torch.Tensor  # [A, D] fp32: sum of p_t * h_t so far
    remaining: torch.Tensor  # [A] fp32: R
    gate_sum: torch.Tensor  # [A, 2] fp32
    eps: torch.Tensor  # [A] halting threshold of each token's request
    loops: torch.Tensor  # [A] max loops of each token's request
    cos: torch.Tensor  # [A, 1, hd/2]
    sin: torch.Tensor  # [A, 1, hd/2]
    blocks: torch.Tensor  # [A] KV block of each token
    offsets: torch.Tensor  # [A] offset in that block

    def select(self, keep: torch.Tensor, state: torch.Tensor) -> ActiveTokens:
        """The rows in `keep` [A] bool, with their new hidden state [A', D]."""
        rows = keep.nonzero().squeeze(1)  # one mask-to-index conversion for every field
        fields = {f.name: getattr(self, f.name).index_select(0, rows)
                  for f in dataclasses.fields(self) if f.name != "state"}
        return ActiveTokens(state=state, **fields)


@dataclasses.dataclass
class LayerResult:
    """A layer's output for every token of the step, filled in as tokens halt."""

    out: torch.Tensor  # [T, D] fp32 ACT mixture
    depth: torch.Tensor  # [T] long
    gates: torch.Tensor  # [T, 2] fp32 mean gate over executed steps

    def record(self, tokens: ActiveTokens, halted: torch.Tensor, step: int) -> None:
        ids = tokens.ids[halted]
        self.out[ids] = tokens.mixture[halted]
        self.depth[ids] = step
        self.gates[ids] = tokens.gate_sum[halted] / step


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
    def copy_blocks(self, copies: list[BlockCopy]) -> None:
        """Copy whole blocks (every plane) in every layer: the partial block of a fork."""
        device = self.model.device
        src = torch.tensor([c.src for c in copies], dtype=torch.long, device=device)
        dst = torch.tensor([c.dst for c in copies], dtype=torch.long, device=device)
        for cache in self.kv_caches:
            cache.index_copy_(0, dst, cache.index_select(0, src))

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
            layer = self._run_layer(index, block, h, plan, slots, eps, loops, cos, sin, calls)
            h = layer.out.to(h.dtype)
            depths.append(layer.depth)
            gates.append(layer.gates)
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
                   calls: list[tuple[int, int, int]]) -> LayerResult:
        total, width = h.shape
        cache = self.kv_caches[index]
        result = LayerResult(
            out=torch.empty(total, width, dtype=torch.float32, device=h.device),
            depth=torch.empty(total, dtype=torch.long, device=h.device),
            gates=torch.empty(total, 2, dtype=torch.float32, device=h.device))
        tokens = ActiveTokens(
            ids=torch.arange(total, device=h.device), state=h,
            mixture=torch.zeros(total, width, dtype=torch.float32, device=h.device),
            remaining=torch.ones(total, dtype=torch.float32, device=h.device),
            gate_sum=torch.zeros(total, 2, dtype=torch.float32, device=h.device),
            eps=eps, loops=loops, cos=cos, sin=sin, blocks=slots[0], offsets=slots[1])
        for step in range(1, self.config.max_loops + 1):
            calls.append((index, step, tokens.ids.numel()))
            x, gates = block.read_memory(tokens.state, self.model.global_bank)
            q, k, v = block.project_qkv(x, tokens.cos, tokens.sin)
            kv = torch.stack((k, v), dim=1)  # [A, 2, Hkv, hd]
            cache[tokens.blocks, step - 1, :, tokens.offsets] = kv
            h_step = block.finish_step(x, plan.attend(cache, step - 1, tokens.ids, q), step)
            halted = self._mix(tokens, block, h_step, gates, step)
            if not bool(halted.any()):
                tokens.state = h_step
                continue
            result.record(tokens, halted, step)
            self._copy_halted_kv(cache, tokens.blocks[halted], tokens.offsets[halted],
                                 kv[halted], step)
            keep = ~halted
            tokens = tokens.select(keep, h_step[keep])  # the regrouping: a smaller batch
            if tokens.ids.numel() == 0:
                break
        return result

    @staticmethod
    def _mix(tokens: ActiveTokens, block: LoopBlock, h_step: torch.Tensor, gates: torch.Tensor,
             step: int) -> torch.Tensor:
        """ACT update of the active tokens; returns which of them halt at this step [A].
        A halting token's leftover mass R goes to its last state h_step."""
        p = block.halt_probability(h_step, step) * tokens.remaining  # [A]
        tokens.remaining = tokens.remaining - p
        halted = (tokens.remaining < tokens.eps) | (tokens.loops <= step)
        weight = torch.where(halted, p + tokens.remaining, p)
        tokens.mixture += weight.unsqueeze(-1) * h_step.float()
        tokens.gate_sum += gates
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
