"""Decode attention through the Triton paged kernel (`engine/triton_paged.py`,
`--attention-backend triton`): one call equals the gather path for any block table and
length, a halted row of the masked form reads one key, and start-up holds the kernel to
the gather path. The engine through it: tests/test_decode_backends.py.

On a CPU the kernel runs under Triton's interpreter (`tests/conftest.py` sets it before
anything imports Triton); `LOOPSERVE_TEST_DEVICE=cuda` runs the compiled kernel."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from engine import flex_probe  # noqa: E402
from engine.errors import ConfigError  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.paged_attention import decode_attention, gather_blocks  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.triton_paged import TritonDecode  # noqa: E402
from tests.helpers import (  # noqa: E402
    GREEDY,
    TEST_DEVICE,
    make_model,
    random_prompts,
)


def _gathered(cache, plane, blocks, lengths, q):
    """The gather path's arithmetic: [n, H * hd]."""
    kv = gather_blocks(cache, plane, blocks, None)
    valid = torch.arange(kv.shape[1], device=q.device)[None, :] < lengths[:, None]
    return decode_attention(q, kv[:, :, 0], kv[:, :, 1], valid)


@pytest.mark.parametrize("block_size, group, dtype", [(4, 1, torch.float32),
                                                      (8, 2, torch.float32),
                                                      (16, 3, torch.float32),
                                                      (16, 2, torch.bfloat16)])
def test_one_call_equals_the_gather_path(block_size, group, dtype):
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(40, 3, block_size, 2, 2, 16, generator=gen).to(TEST_DEVICE, dtype)
    # row 0 ends on a block boundary, rows 1 and 2 share their first block (a prefix hit),
    # row 3 reads one position, row 4 spans more than one 64-key tile
    width = -(-80 // block_size)
    tables = [[5, 9, 2], [7, 11], [7, 4, 13], [21], list(range(10, 10 + width))]
    blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=TEST_DEVICE)
    lengths = torch.tensor([3 * block_size, block_size + 1, 2 * block_size + 3, 1, 80],
                           device=TEST_DEVICE)
    q = torch.randn(5, 2 * group, 16, generator=gen).to(TEST_DEVICE, dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2,
                                                                            "atol": 2e-2}
    kernel = TritonDecode(torch.device(TEST_DEVICE), 16)
    for plane in range(3):
        got = kernel.attend(cache, plane, q, blocks, lengths)
        torch.testing.assert_close(got, _gathered(cache, plane, blocks, lengths, q),
                                   **tolerance)
    flex_probe.probe(kernel, cache, 39, heads=2 * group)  # start-up's check accepts it


def test_a_halted_row_of_the_masked_form_reads_one_key(model, monkeypatch):
    """Masked decode steps pass each row's loop state: a halted row's length is 1, a
    looping row's its context, so the KV bytes read follow the loops actually spent."""
    llm = LLM(model, block_size=4, num_kv_blocks=128, attention_backend="triton",
              loop_form="masked", static_decode="off")
    seen = []
    attend = TritonDecode.attend

    def recording(cache, plane, q, blocks, lengths):
        seen.append((plane, lengths.tolist()))
        return attend(cache, plane, q, blocks, lengths)

    monkeypatch.setattr(TritonDecode, "attend", staticmethod(recording))
    prompts = random_prompts(6, seed=5, low=9, high=14)
    params = SamplingParams(max_tokens=4, halt_threshold=0.3, **GREEDY)
    outputs = llm.generate(prompts, params)
    later = [lengths for plane, lengths in seen if plane > 0]
    assert later and any(1 in lengths for lengths in later)  # some rows halted, read 1 key
    first = [lengths for plane, lengths in seen if plane == 0]
    assert all(min(lengths) > 1 for lengths in first)  # step 1: every row loops
    assert any(o.compute.mean_loops_per_token < model.config.max_loops for o in outputs)


@pytest.fixture(scope="module")
def model():
    return make_model(seed=3)


def test_start_up_holds_the_kernel_to_the_gather_path(monkeypatch):
    seen = []

    def refuse(got, want, block_size, backend):
        seen.append((block_size, backend))
        raise ConfigError("wrong attention (a test's refusal)")

    monkeypatch.setattr(flex_probe, "check", refuse)
    with pytest.raises(ConfigError, match="a test's refusal"):
        LLM(make_model(seed=3), block_size=4, num_kv_blocks=16, attention_backend="triton")
    assert seen == [(4, "triton")]


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the CPU's refusal")
def test_on_a_cpu_without_the_interpreter_the_backend_is_refused_naming_the_flag(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="needs a CUDA device.*--attention-backend gather"):
        LLM(make_model(), attention_backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ConfigError, match="power-of-two head_dim.*--attention-backend gather"):
        LLM(make_model(d_model=48, head_dim=12), attention_backend="triton")
