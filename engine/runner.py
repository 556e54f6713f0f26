"""ModelRunner: owns the device and the KV pool; runs the dynamic-depth forward of a step.

Layer by layer (DESIGN section 4):

    state = every token of the step ; R = 1 ; out = 0
    for t = 1..N (the step's largest max_loops):
        one form of the (layer, t) step, chosen by the `FormPolicy`:
          masked     every row; halted rows keep their state (torch.where), no host sync
          compacted  only the rows still looping, gathered and scattered back
        memory read -> qkv -> plane t gets kv_t (active rows) or kv_last (halted rows)
        attention over plane t -> MLP -> router -> p_t, R_t ; out += p_t * h_t
        halted = R_t < eps (of its request) or t == max_loops (of its request)
    planes past the last step run get every row's kv_last (the KV rule)

Both forms equal `LoopLM.reference_forward` and mix freely (`engine/loop_step.py`).
`max_depth=True` runs every token for N steps (what an engine without halting does), for
side-by-side measurement. The step's per-token depths, gate means and per-(layer, step)
active counts come back to the host in one copy at the end.
"""

from __future__ import annotations

import dataclasses

import torch

from engine import flex_probe
from engine.block_manager import BlockCopy
from engine.errors import ConfigError
from engine.flex_paged import FlexDecode
from engine.form_policy import COMPACTED, FormPolicy, calibrate
from engine.fused_chains import CompiledChains
from engine.fused_step import FusedLayer
from engine.loop_step import (
    LayerState,
    StepTokens,
    active_rows,
    compacted_step,
    fill_later_planes,
    first_masked_step,
    halt_thresholds,
    masked_step,
    plane_slots,
)
from engine.paged_attention import AttentionPlan, GatherWorkspace
from engine.serving_block import ServingBlock, rope_table
from engine.static_decode import StaticDecode, StaticInputs
from engine.step_upload import StepUpload
from engine.triton_paged import TritonDecode
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
class DeviceStepOutput:
    """A step's results still on the device; `ModelRunner.fetch` reads them back."""

    logits: torch.Tensor  # [S, V] fp32, rows as in StepInput.sample_rows
    depths: torch.Tensor  # [T, L] long
    gates: torch.Tensor  # [T, L, 2] fp32
    num_steps: int  # loop steps the layers ran


@dataclasses.dataclass
class StepOutput:
    logits: torch.Tensor  # [S, V] fp32, rows as in StepInput.sample_rows
    depths: torch.Tensor  # [T, L] long on CPU
    gates: torch.Tensor  # [T, L, 2] fp32 on CPU: mean over executed steps
    active_per_call: list[tuple[int, int, int]]  # (layer, step, active tokens) per step run


class ModelRunner:
    def __init__(self, model: LoopLM, num_blocks: int, block_size: int,
                 max_depth: bool = False, loop_form: str = "auto",
                 calibration_rows: int = 256, static_decode: bool = False,
                 max_num_seqs: int = 64, max_model_len: int | None = None,
                 compile_chains: bool = False, attention_backend: str = "gather") -> None:
        self.model = model
        self.config = model.config
        self.block_size = block_size
        self.max_depth = max_depth
        # the layers' weights rearranged for serving (a snapshot: made once, here)
        self.blocks = [ServingBlock(b, model.global_bank) for b in model.layers]
        self.upload = StepUpload(model.device)
        # t * bs: plane t's pool rows are plane 0's plus this (loop_step.plane_slots)
        self.plane_offsets = torch.arange(model.config.max_loops,
                                          device=model.device) * block_size
        self.gather = GatherWorkspace()  # every eager attention call's k/v gather
        # decodes through FlexAttention over the pool in place (None: they gather)
        self.flex = FlexDecode(model.device, max_num_seqs) if attention_backend == "flex" \
            else None
        # decodes through the Triton paged kernel, to each row's length (None: as above)
        self.paged = TritonDecode(model.device, model.config.head_dim) \
            if attention_backend == "triton" else None
        # masked steps through the fused chains (torch.compile), or loop_step's eager ones
        chains = CompiledChains() if compile_chains else None
        self.fused = [FusedLayer(b, chains) for b in self.blocks] if chains else None
        cost_model = calibrate(model, calibration_rows) if loop_form == "auto" else None
        self.policy = FormPolicy(model.config.n_layers, model.config.max_loops, loop_form,
                                 cost_model)
        cfg = self.config
        # one block more than the manager hands out: the scratch block of padded rows
        # k and v of a position side by side: a block's plane reads as one [bs, 2, Hkv, hd] run
        shape = (num_blocks + 1, cfg.max_loops, block_size, 2, cfg.n_kv_heads, cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=model.dtype, device=model.device)
                          for _ in range(cfg.n_layers)]
        if self.fused is not None:
            try:  # before any graph capture: nothing compiles inside one
                self._warm_up_chains()
            except Exception as exc:  # torch.compile's failures are many; all end start-up
                raise ConfigError(f"compile_chains: torch.compile failed at start-up "
                                  f"({type(exc).__name__}: {exc}); run without "
                                  f"--compile-chains") from exc
        if self.flex is not None or self.paged is not None:
            try:  # before any graph capture, as the chains
                self._warm_up_attention()
            except ConfigError:  # it compiled, and answers wrongly
                raise
            except Exception as exc:
                name = (self.flex or self.paged).name
                raise ConfigError(f"attention_backend '{name}': its kernel failed at "
                                  f"start-up ({type(exc).__name__}: {exc}); run with "
                                  f"--attention-backend gather") from exc
        self.static = None
        if static_decode:
            width = -(-(max_model_len or cfg.max_position) // block_size)
            self.static = StaticDecode(self._static_forward, max_num_seqs, width,
                                       cfg.max_loops, block_size, num_blocks, model.device,
                                       capture=True)
            if self.static.capture:
                with torch.inference_mode():
                    self.static.capture_all()  # at start-up, not in the first requests

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
    def run(self, step: StepInput) -> DeviceStepOutput:
        layout, uploaded = self._upload(step)
        if self._fits_static(step):
            every_step = halt_thresholds(uploaded["eps"], uploaded["loops"],
                                         self.config.max_loops)
            outputs = self.static.run({**uploaded, "halt_below": every_step},
                                      len(step.token_ids), uploaded["decode_blocks"].shape[1])
            if outputs is not None:
                return DeviceStepOutput(*outputs, self.config.max_loops)
        num_steps = self.config.max_loops if self.max_depth else max(step.max_loops)
        tokens = self._step_tokens(layout, uploaded, num_steps)
        h = self.model.embed(uploaded["token_ids"])
        layers = []
        for index, block in enumerate(self.blocks):
            layers.append(self._run_layer(index, block, h, tokens, num_steps))
            h = layers[-1].mixture.to(h.dtype)
        logits = self.model.logits(h[uploaded["sample_rows"]])
        return DeviceStepOutput(logits, *_depths_and_gates(layers), num_steps)

    def _fits_static(self, step: StepInput) -> bool:
        """Decodes only, each asking for its next token alone."""
        return (self.static is not None and step.num_decodes == len(step.lengths)
                and len(step.sample_rows) == len(step.token_ids))

    def _static_forward(self, inputs: StaticInputs) -> tuple[torch.Tensor, ...]:
        """The whole decode forward on a bucket's buffers: every layer, every loop step in
        the masked form (fixed shapes, no host sync: what a CUDA graph captures)."""
        positions = inputs.positions
        rope = rope_table(*self.model.rotary.tables(positions))
        tokens = StepTokens(rope=rope, halt_below=inputs.halt_below,
                            slots=plane_slots(inputs.slots, self.plane_offsets),
                            plan=inputs.plan(self.block_size, self._static_workspace(),
                                             self.flex, self.paged))
        h = self.model.embed(inputs.token_ids)
        layers = []
        for index in range(len(self.blocks)):
            layer = self._first_masked(index, tokens, h)
            for step in range(2, self.config.max_loops + 1):
                self._masked(index, tokens, layer, step)
            layers.append(layer)
            h = layer.mixture.to(h.dtype)
        return self.model.logits(h), *_depths_and_gates(layers)

    def _static_workspace(self) -> GatherWorkspace | None:
        """A captured graph gathers into its own pool (a shared buffer could move after
        capture); an eager run of the static forward shares the runner's buffer."""
        return self.gather if self.static is not None and not self.static.capture else None

    def fetch(self, out: DeviceStepOutput, extra: torch.Tensor | None = None
              ) -> tuple[StepOutput, torch.Tensor | None]:
        """Depths [T, L], gates [T, L, 2] and `extra` (the sampler's table) to the host in
        one copy; the active tokens of each (layer, step) are those whose depth reaches
        the step. Returns the host step output and the host copy of `extra`."""
        total, layers = out.depths.shape
        parts = [out.depths.flatten().double(), out.gates.flatten().double()]
        if extra is not None:
            parts.append(extra.flatten().double())
        packed = torch.cat(parts).cpu()
        host_depths = packed[:total * layers].long().view(total, layers)
        host_gates = packed[total * layers:total * layers * 3].float().view(total, layers, 2)
        host_extra = packed[total * layers * 3:].view(extra.shape) if extra is not None else None
        steps = torch.arange(1, out.num_steps + 1)
        host_counts = (host_depths.t()[:, :, None] >= steps).sum(1).tolist()  # [L][n]
        self.policy.observe(host_counts, total)
        calls = [(layer, t + 1, count) for layer, row in enumerate(host_counts)
                 for t, count in enumerate(row) if count]
        return StepOutput(logits=out.logits, depths=host_depths, gates=host_gates,
                          active_per_call=calls), host_extra

    def _upload(self, step: StepInput) -> tuple[dict, dict[str, torch.Tensor]]:
        """Every input of the step in one upload; returns the attention layout and the
        uploaded tensors."""
        upload = self.upload
        upload.add("token_ids", step.token_ids)
        upload.add("positions", step.positions)
        upload.add("slots", self._slots(step))
        upload.add("sample_rows", step.sample_rows)
        lengths = step.lengths
        if self.max_depth:
            eps = [-1.0] * len(step.token_ids)
            loops = [self.config.max_loops] * len(step.token_ids)
        else:
            eps = _per_token(step.halt_thresholds, lengths)
            loops = _per_token(step.max_loops, lengths)
        upload.add("loops", loops)
        upload.add_floats("eps", eps)
        layout = AttentionPlan.pack(upload, step.block_tables, step.starts, lengths,
                                    step.num_decodes, self.block_size)
        return layout, upload.upload()

    def _step_tokens(self, layout: dict, uploaded: dict[str, torch.Tensor], num_steps: int
                     ) -> StepTokens:
        """The per-token views every layer of an eager step shares."""
        positions = uploaded["positions"]
        rope = rope_table(*self.model.rotary.tables(positions))  # [T, 1, hd/2] complex64
        halt_below = halt_thresholds(uploaded["eps"], uploaded["loops"], num_steps)
        return StepTokens(rope=rope, halt_below=halt_below,
                          slots=plane_slots(uploaded["slots"], self.plane_offsets),
                          plan=AttentionPlan.build(layout, uploaded, self.gather, self.flex,
                                                   self.paged))

    def _slots(self, step: StepInput) -> list[int]:
        """The pool row (`loop_step.pool_rows`) each token's plane-0 k/v are written to."""
        size, per_block = self.block_size, self.block_size * self.config.max_loops
        return [table[p // size] * per_block + p % size
                for table, start, length in zip(step.block_tables, step.starts, step.lengths,
                                                strict=True)
                for p in range(start, start + length)]

    def _run_layer(self, index: int, block: ServingBlock, h: torch.Tensor,
                   tokens: StepTokens, num_steps: int) -> LayerState:
        cache = self.kv_caches[index]
        total = h.shape[0]
        layer = self._first_masked(index, tokens, h)  # every row runs step 1: no form to choose
        for step in range(2, num_steps + 1):
            if self.policy.form(index, step, total) == COMPACTED:
                rows = active_rows(layer)  # the sync the form pays for its shape
                count = rows.numel()
                if count == 0:  # no token left: this plane and later show kv_last
                    fill_later_planes(cache, tokens, layer, step - 1, self.config.max_loops)
                    return layer
                if count < total:  # else no gathers: every row goes through
                    compacted_step(block, cache, tokens, layer, step, rows)
                    continue
            self._masked(index, tokens, layer, step)
        fill_later_planes(cache, tokens, layer, num_steps, self.config.max_loops)
        return layer

    @torch.inference_mode()
    def _warm_up_chains(self) -> None:
        """Compile every chain variant now (start-up), not in the first requests: one
        decode row, then two (a graph for a single row and one for any number of rows),
        every loop step of layer 0 (one graph serves every layer), into the scratch block."""
        cfg, scratch = self.config, self.kv_caches[0].shape[0] - 1
        for rows in (1, 2):
            step = StepInput(token_ids=[0] * rows, positions=[0] * rows,
                             block_tables=[[scratch]] * rows, starts=[0] * rows,
                             lengths=[1] * rows, halt_thresholds=[-1.0] * rows,
                             max_loops=[cfg.max_loops] * rows, sample_rows=list(range(rows)),
                             num_decodes=rows)
            layout, uploaded = self._upload(step)
            tokens = self._step_tokens(layout, uploaded, cfg.max_loops)
            layer = self._first_masked(0, tokens, self.model.embed(uploaded["token_ids"]))
            for t in range(2, cfg.max_loops + 1):
                self._masked(0, tokens, layer, t)

    @torch.inference_mode()
    def _warm_up_attention(self) -> None:
        """Compile the in-place decode kernel now, over the scratch block of layer 0's pool,
        and hold it to the gather path (`engine/flex_probe.py`)."""
        cache = self.kv_caches[0]
        flex_probe.probe(self.flex or self.paged, cache, cache.shape[0] - 1,
                         self.config.n_heads)

    def _first_masked(self, index: int, tokens: StepTokens, h: torch.Tensor) -> LayerState:
        if self.fused is not None:
            return self.fused[index].first_step(self.kv_caches[index], tokens, h)
        return first_masked_step(self.blocks[index], self.kv_caches[index], tokens, h)

    def _masked(self, index: int, tokens: StepTokens, layer: LayerState, step: int) -> None:
        if self.fused is not None:
            self.fused[index].step(self.kv_caches[index], tokens, layer, step)
        else:
            masked_step(self.blocks[index], self.kv_caches[index], tokens, layer, step)


def _depths_and_gates(layers: list[LayerState]) -> tuple[torch.Tensor, torch.Tensor]:
    """Depths [T, L] and mean gates [T, L, 2] of the step's layers: one division for every
    layer (not one per layer)."""
    depths = torch.stack([layer.depth for layer in layers], -1)  # [T, L]
    gate_sums = torch.stack([layer.gate_sum for layer in layers], -2)  # [T, L, 2]
    return depths, gate_sums / depths.unsqueeze(-1)


def _per_token(values: list, lengths: list[int]) -> list:
    """A per-sequence value repeated for each of the sequence's tokens of the step."""
    return [v for v, n in zip(values, lengths, strict=True) for _ in range(n)]
