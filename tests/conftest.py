"""Shared fixtures: small seeded models on CPU in fp32 (factories live in tests.helpers)."""

from __future__ import annotations

import pytest
import torch

from model import LoopLM
from tests.helpers import make_model

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_model() -> LoopLM:
    return make_model()
