"""Shared fixtures: small seeded models on CPU in fp32."""

from __future__ import annotations

import pytest
import torch

from engine import LoopLM, ModelConfig

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_model(seed: int = 0, **overrides) -> LoopLM:
    """A tiny LoopLM with random weights; router and loop scales spread so depths vary."""
    torch.manual_seed(seed)
    config = ModelConfig(**overrides)
    model = LoopLM(config).eval()
    with torch.no_grad():
        for block in model.layers:
            block.loop_scale.uniform_(-1.0, 1.0)  # make every step matter
            block.router.weight.normal_(0.0, 0.3)
            block.router.bias.normal_(0.0, 0.5)
    return model


@pytest.fixture
def tiny_model() -> LoopLM:
    return make_model()
