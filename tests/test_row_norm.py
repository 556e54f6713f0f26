"""`RowNorm`: both forms equal `F.rms_norm` (eps included), and the choice per device."""

import pytest
import torch
import torch.nn.functional as F

from engine.row_norm import COMPOSED, FUSED, RowNorm, fused_norms

CPU = torch.device("cpu")


@pytest.mark.parametrize("form", [FUSED, COMPOSED])
@pytest.mark.parametrize("scale", [1.0, 1e-3])  # 1e-3: eps is a tenth of mean(x^2)
def test_both_forms_equal_rms_norm(form, scale):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 64, generator=gen) * scale
    weight = torch.randn(64, generator=gen)
    norm = RowNorm(1e-6 if scale == 1.0 else 1e-7, CPU, form)
    for w in (None, weight):
        expected = F.rms_norm(x, (64,), w, norm.eps)
        got = norm(x, w)
        assert got.dtype == x.dtype and got.shape == x.shape
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_the_composed_form_reads_a_strided_view():
    x = torch.randn(4, 3 * 32)
    view = x[:, 32:64]  # a row stride of 96, as the q/k heads inside the qkv output
    torch.testing.assert_close(RowNorm(1e-6, CPU, COMPOSED)(view),
                               F.rms_norm(view, (32,), None, 1e-6), rtol=1e-6, atol=1e-7)


def test_the_form_follows_the_device_and_dtype():
    assert RowNorm.for_device(1e-6, CPU, torch.float32).form == COMPOSED
    assert RowNorm.for_device(1e-6, CPU, torch.bfloat16).form == FUSED  # no cast kernel
    assert RowNorm.for_device(1e-6, torch.device("meta"), torch.float32).form == FUSED


def test_an_unknown_form_is_refused_by_name():
    with pytest.raises(ValueError, match="'fused' or 'composed'"):
        RowNorm(1e-6, CPU, "layer")


def test_fused_norms_swaps_for_a_while_and_restores():
    class Block:
        norm = RowNorm(1e-5, CPU, COMPOSED)

    blocks = [Block(), Block()]
    with fused_norms(blocks):
        assert all(b.norm.form == FUSED and b.norm.eps == 1e-5 for b in blocks)
    assert all(b.norm.form == COMPOSED for b in blocks)
    with pytest.raises(RuntimeError), fused_norms(blocks):
        raise RuntimeError("a failing count")
    assert all(b.norm.form == COMPOSED for b in blocks)


@torch.no_grad()
def test_a_cpu_fp32_engine_composes_its_norms_and_stays_exact(tiny_model):
    from engine.serving_block import ServingBlock

    model = tiny_model
    block = ServingBlock(model.layers[0], model.global_bank)
    assert block.norm.form == COMPOSED  # the engine tests hold this path to the reference
    h = torch.randn(3, model.config.d_model)
    composed = block.read_memory(h)[0]
    with fused_norms([block]):
        torch.testing.assert_close(block.read_memory(h)[0], composed, rtol=1e-5, atol=1e-6)
