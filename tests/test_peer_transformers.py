"""The transformers comparison: the weight copy is exact, greedy tokens agree, and the matmul
floor is reported (a tiny run; the figures themselves come from the benchmark)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks.matmul_floor import matmul_floor_seconds, weight_matrices  # noqa: E402
from benchmarks.peer_transformers import build_loopserve, main  # noqa: E402


def test_the_same_model_runs_in_both_with_its_floor(capsys):
    result = main(["--batch-sizes", "2", "--prompt-len", "6", "--output-len", "3",
                   "--repeats", "1"])
    assert result["logit_check"]["equal"] and result["goal_ratio"] == 1.5
    (row,) = result["results"]
    assert row["greedy_tokens_equal_dynamic"] == 1.0
    assert min(row["matmul_share_loopserve"], row["matmul_share_transformers_dynamic"]) > 0
    assert row["ceiling_over_transformers_dynamic"] == pytest.approx(
        1 / row["matmul_share_transformers_dynamic"])
    assert '"benchmark": "peer_transformers"' in capsys.readouterr().out


def test_the_static_cache_runs_eagerly_and_agrees():
    """transformers' static cache (what the GPU suite adds), with its auto-compile off."""
    result = main(["--batch-sizes", "1", "--prompt-len", "6", "--output-len", "3",
                   "--repeats", "1", "--hf-caches", "static"])
    (row,) = result["results"]
    assert row["greedy_tokens_equal_static"] == 1.0
    assert result["transformers_static_compiled"] is False


def test_the_floor_multiplies_every_weight_once_per_pass():
    model = build_loopserve(0)
    mats = weight_matrices(model)
    assert len(mats) == 4 * model.config.n_layers + 1 and mats[-1] is model.lm_head.weight
    # every matrix but the embedding lookup and the router (unused at max_loops=1)
    used = sum(p.numel() for n, p in model.named_parameters()
               if p.dim() == 2 and "router" not in n and n != "embed.weight")
    assert sum(w.numel() for w in mats) == used
    assert matmul_floor_seconds(model, 1, 2, 2, "cpu", repeats=1) > 0
    torch.testing.assert_close(mats[0], model.layers[0].qkv.weight)
