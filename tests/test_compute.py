"""The analytic FLOP formula against torch.utils.flop_counter on the exact path."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from engine import ModelConfig
from model.flops import (
    attention_flops,
    block_matmul_flops,
    causal_attention_flops,
    layer_flops,
    lm_head_flops,
    sequence_matmul_flops,
    token_flops,
)
from tests.helpers import make_model

CONFIGS = [
    {},  # tiny: loops 3, both banks, GQA
    {"max_loops": 1, "local_memory_slots": 0, "global_memory_slots": 0},
    {"max_loops": 4, "local_memory_slots": 32, "global_memory_slots": 0, "n_kv_heads": 4},
    {"d_model": 128, "n_heads": 8, "head_dim": 16, "n_kv_heads": 1, "ffn_hidden": 320,
     "n_layers": 3, "max_loops": 2, "local_memory_slots": 0, "global_memory_slots": 64},
]


def _counted(model, ids) -> tuple[int, int]:
    """(matmul FLOPs, SDPA FLOPs) that FlopCounterMode charges for an exact forward.

    The counter does not know the fused CPU attention kernel, so attention runs on the math
    backend, where SDPA is exactly two bmm calls (nothing else in the model uses bmm)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.reference_forward(ids)
    counts = {str(op): v for op, v in counter.get_flop_counts()["Global"].items()}
    sdpa = counts.get("aten.bmm", 0)
    return counter.get_total_flops() - sdpa, sdpa


@pytest.mark.parametrize("overrides", CONFIGS)
def test_matmul_flops_match_flop_counter(overrides):
    model = make_model(**overrides)
    cfg = model.config
    batch, seq = 2, 24
    ids = torch.randint(0, 256, (batch, seq))
    matmul, sdpa = _counted(model, ids)
    analytic = sequence_matmul_flops(cfg, batch * seq)
    # the reference evaluates the router with a mat-vec product the counter does not see
    router = batch * seq * cfg.n_layers * (cfg.max_loops - 1) * 2 * (cfg.d_model + 1)
    assert abs(matmul - (analytic - router)) <= 0.02 * analytic
    # the counter charges SDPA for the full T x T square; causal serving pays for the
    # lower triangle only: query i attends to i + 1 keys
    full_square = cfg.n_layers * cfg.max_loops * batch * 4 * cfg.n_heads * cfg.head_dim * seq * seq
    assert sdpa == full_square
    causal = batch * causal_attention_flops(cfg, seq)
    assert causal == full_square * (seq + 1) // (2 * seq)


def test_token_flops_add_up():
    cfg = ModelConfig()
    per_step = [block_matmul_flops(cfg, t) for t in (1, 2, 3)]
    assert per_step[0] == per_step[1] > per_step[2]  # no router at the last step
    assert layer_flops(cfg, 2, 10) == per_step[0] + per_step[1] + 2 * attention_flops(cfg, 10)
    full = token_flops(cfg, [3, 3], 10, with_logits=True)
    assert full == 2 * layer_flops(cfg, 3, 10) + lm_head_flops(cfg)
    assert token_flops(cfg, [1, 2], 10, with_logits=False) < full


def test_compute_summaries_merge_exactly_from_raw_sums():
    from engine.compute_stats import ComputeSummary

    a = ComputeSummary(3, 10, (20.0, 10.0), (5.0, 1.0), 600.0, 1000.0)
    b = ComputeSummary(2, 30, (30.0, 30.0), (3.0, 3.0), 400.0, 1000.0)
    merged = a.merge(b)
    assert merged.tokens == 40 and merged.max_loops == 3
    assert merged.loops_per_layer == [50 / 40, 40 / 40]  # not the mean of the two means
    assert merged.memory_gate_per_layer == [8 / 40, 4 / 40]
    assert merged.compute_saved == 1 - 1000 / 2000
    assert merged.as_dict()["flops"] == 1000
    assert a.merge(b) == b.merge(a)


def test_the_choices_of_a_request_merge_into_its_compute(tiny_model):
    from engine import LLM, SamplingParams

    llm = LLM(tiny_model, num_kv_blocks=64, block_size=4)
    out = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(max_tokens=4, n=3, temperature=0.9,
                                                         seed=1, ignore_eos=True))[0]
    # the prompt once (5 tokens) and each choice's 3 decoded tokens after its first
    assert out.compute.tokens == 5 + 3 * 3
    assert out.compute.flops <= out.compute.flops_max_depth
