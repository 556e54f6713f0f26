"""The masked form of a (layer, loop step) through the fused chains (`engine/fused_chains.py`).

The same contract as `loop_step.masked_step` and `loop_step.first_masked_step`: every row
goes through the step, plane t receives `where(active, kv_t, kv_last)`, halted rows keep
their state and add nothing; the layer's `LayerState` is updated (or made, at step 1).
Between the two chains only the plane write and the paged attention call run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.fused_chains import (
    ChainWeights,
    CompiledChains,
    Shapes,
    first_post_attention,
    post_attention,
    pre_attention,
)
from engine.loop_step import LayerState, StepTokens, write_plane
from engine.serving_block import ServingBlock


class FusedLayer:
    """One layer's masked steps through the chains: compiled (`CompiledChains`) or the
    same functions eagerly (how tests check the chains' arithmetic on its own)."""

    def __init__(self, block: ServingBlock, chains: CompiledChains | None) -> None:
        self.weights = ChainWeights.of(block)
        self.shapes = Shapes.of(block)
        self.max_loops = block.cfg.max_loops
        self.pre: Callable = chains.pre if chains else pre_attention
        self.post: Callable = chains.post if chains else post_attention
        self.first_post: Callable = chains.first_post if chains else first_post_attention

    def _bias(self, step: int) -> torch.Tensor | None:
        return None if step == self.max_loops else self.weights.router_bias[step - 1]

    def first_step(self, cache: torch.Tensor, tokens: StepTokens, h: torch.Tensor
                   ) -> LayerState:
        """Step 1 of every row of h [T, D]: the layer's state, made."""
        x, gates, q, kv = self.pre(h, tokens.rope_pairs, None, None, self.weights,
                                   self.shapes)
        write_plane(cache, tokens, 0, kv)
        attn = tokens.plan.attend(cache, 0, None, q)
        state = self.first_post(x, attn, gates, tokens.halt_below[0], self.weights,
                                self.shapes, self._bias(1))
        return LayerState(*state, kv_last=kv)

    def step(self, cache: torch.Tensor, tokens: StepTokens, layer: LayerState, step: int
             ) -> None:
        """Step `step` >= 2 of every row; halted rows keep what they have."""
        x, gates, q, kv = self.pre(layer.state, tokens.rope_pairs, layer.kv_last,
                                   layer.active, self.weights, self.shapes)
        write_plane(cache, tokens, step - 1, kv)
        attn = tokens.plan.attend(cache, step - 1, None, q, layer.active)
        before = (layer.state, layer.mixture, layer.remaining, layer.active, layer.depth,
                  layer.gate_sum)
        (layer.state, layer.mixture, layer.remaining, layer.active, layer.depth,
         layer.gate_sum) = self.post(x, attn, gates, before, tokens.halt_below[step - 1],
                                     self.weights, self.shapes,
                                     self.weights.scales[step - 1], self._bias(step))
        layer.kv_last = kv
