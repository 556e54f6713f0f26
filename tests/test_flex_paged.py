"""Decode attention through FlexAttention over the pool in place (`engine/flex_paged.py`,
`--attention-backend flex`): one call equals the gather path for any block table (or
start-up refuses the kernel), and failures name the flag. The engine through it:
tests/test_decode_backends.py."""

from __future__ import annotations

import shutil

import pytest
import torch

from engine import flex_probe
from engine.errors import ConfigError
from engine.flex_paged import FlexDecode
from engine.flex_probe import check, probe
from engine.llm import LLM
from engine.paged_attention import gather_blocks
from tests.helpers import (
    make_model,
)

pytestmark = pytest.mark.skipif(not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")),
                                reason="torch.compile on CPU needs a C++ compiler")


def _gathered(cache: torch.Tensor, plane: int, blocks: torch.Tensor, contexts: torch.Tensor,
              q: torch.Tensor) -> torch.Tensor:
    """The gather path's arithmetic: [n, H * hd]."""
    kv = gather_blocks(cache, plane, blocks, None)
    valid = torch.arange(kv.shape[1])[None, :] < contexts[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2),
        attn_mask=valid[:, None, None, :], enable_gqa=True)
    return out.flatten(1)


@pytest.mark.parametrize("block_size, dtype", [(4, torch.float32), (8, torch.float32),
                                               (8, torch.bfloat16), (16, torch.bfloat16)])
def test_one_call_equals_the_gather_path_or_start_up_refuses_it(block_size, dtype):
    """Any block table, or, where torch's compiled kernel is wrong on this machine (block
    size 8 on an AVX2 CPU with torch 2.13), the start-up probe refuses and the full
    comparison confirms the kernel is wrong."""
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(30, 3, block_size, 2, 2, 8, generator=gen).to(dtype)
    # row 0 ends on a block boundary, rows 1 and 2 share their first block (a prefix hit),
    # row 3 reads one position; rows padded with block 0 past their blocks
    blocks = torch.tensor([[5, 9, 2], [7, 11, 0], [7, 4, 13], [21, 0, 0]])
    contexts = torch.tensor([3 * block_size, block_size + 1, 2 * block_size + 3, 1])
    q = torch.randn(4, 4, 8, generator=gen).to(dtype)
    flex = FlexDecode(torch.device("cpu"), 8)
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2,
                                                                            "atol": 2e-2}
    calls = [(flex.attend(cache, q, FlexDecode.mask(cache, plane, blocks, contexts)),
              _gathered(cache, plane, blocks, contexts, q)) for plane in range(3)]
    try:
        probe(flex, cache, 29, heads=4)
    except ConfigError as exc:
        assert "--attention-backend gather" in str(exc) and f"block_size {block_size}" in str(exc)
        assert not all(torch.allclose(got, want, **tolerance) for got, want in calls)
        return
    for got, want in calls:
        torch.testing.assert_close(got, want, **tolerance)


def test_the_probe_refuses_a_kernel_that_answers_wrongly():
    want = torch.randn(2, 32)
    check(want + 1e-6, want, 16)  # within fp32 rounding: accepted
    for wrong in (want + 0.5, torch.full_like(want, float("nan"))):
        with pytest.raises(ConfigError, match="block_size 16 in float32.*--attention-backend "
                                              "gather"):
            check(wrong, want, 16)


def test_start_up_runs_the_probe_and_reports_its_refusal(monkeypatch):
    seen = []

    def refuse(got, want, block_size, backend):
        seen.append(block_size)
        raise ConfigError("wrong attention (a test's refusal)")

    monkeypatch.setattr(flex_probe, "check", refuse)
    with pytest.raises(ConfigError, match="a test's refusal"):
        LLM(make_model(seed=3), block_size=4, num_kv_blocks=16, attention_backend="flex")
    assert seen == [4]


def test_attention_backend_is_validated_and_failures_name_the_flag(monkeypatch):
    with pytest.raises(ConfigError, match=r"attention_backend must be one of "
                                          r"\['gather', 'flex', 'triton'\]"):
        LLM(make_model(), attention_backend="paged")
    with monkeypatch.context() as patch:
        patch.setattr("engine.fused_chains.shutil.which", lambda name: None)
        with pytest.raises(ConfigError, match="needs a C/C.. compiler.*--attention-backend gather"):
            LLM(make_model(), attention_backend="flex")

    def broken(self):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr("engine.runner.ModelRunner._warm_up_attention", broken)
    with pytest.raises(ConfigError, match="inductor exploded.*--attention-backend gather"):
        LLM(make_model(), attention_backend="flex")


def test_the_mask_rows_span_the_key_sequence_as_views_of_the_tables():
    from engine.flex_paged import _spanning

    table = torch.arange(6, dtype=torch.int32).view(3, 2)
    view = _spanning(table, 10)
    assert view.shape == (3, 1, 1, 10)
    assert torch.equal(view[:, 0, 0, :2], table)  # every row's own entries come first
    assert view.untyped_storage().nbytes() == (6 + 10) * 4  # not 3 x 10
