"""Shared fixtures: small seeded models on CPU in fp32 (factories live in tests.helpers)."""

from __future__ import annotations

import os

# On a CPU, the Triton paged kernel (tests/test_triton_paged.py) runs under Triton's
# interpreter, which Triton reads when it is imported (torch may import it first)
if os.environ.get("LOOPSERVE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from model import LoopLM  # noqa: E402
from tests.helpers import make_model  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_model() -> LoopLM:
    return make_model()
