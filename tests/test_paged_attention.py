"""The paged attention's k/v gather: the reusable workspace against a plain gather, and
attention with it against attention without it."""

from __future__ import annotations

import pytest
import torch

from engine.paged_attention import AttentionPlan, GatherWorkspace, decode_attention, gather_blocks
from engine.step_upload import StepUpload

BLOCK, PLANES, HKV, HD = 4, 3, 2, 8


def _pool(num_blocks: int = 12, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(num_blocks, PLANES, BLOCK, 2, HKV, HD, generator=gen).to(dtype)


def _plain(cache: torch.Tensor, plane: int, blocks: torch.Tensor) -> torch.Tensor:
    return cache[blocks, plane].flatten(1, 2)  # the gather v0 did: [n, W * bs, 2, Hkv, hd]


def test_gather_into_workspace_equals_a_plain_gather_as_shapes_grow_and_shrink():
    cache, workspace = _pool(), GatherWorkspace()
    for rows, width, plane in [(3, 2, 0), (5, 3, 2), (1, 1, 1), (5, 3, 1), (2, 4, 0)]:
        blocks = torch.randint(0, cache.shape[0], (rows, width))
        got = gather_blocks(cache, plane, blocks, workspace)
        assert got.shape == (rows, width * BLOCK, 2, HKV, HD)
        assert torch.equal(got, _plain(cache, plane, blocks))
        assert torch.equal(gather_blocks(cache, plane, blocks, None), got)


def test_workspace_is_reused_and_follows_the_dtype():
    cache, workspace = _pool(), GatherWorkspace()
    big = gather_blocks(cache, 0, torch.arange(8).view(2, 4), workspace)
    pointer, size = big.data_ptr(), workspace.nbytes
    small = gather_blocks(cache, 1, torch.tensor([[3, 1]]), workspace)
    assert small.data_ptr() == pointer and workspace.nbytes == size  # no new buffer
    half = _pool(dtype=torch.bfloat16)
    got = gather_blocks(half, 2, torch.tensor([[0, 5]]), workspace)
    assert got.dtype == torch.bfloat16 and torch.equal(got, _plain(half, 2, torch.tensor([[0, 5]])))


def _plan(workspace: GatherWorkspace | None) -> AttentionPlan:
    """Three decodes (contexts 3, 9, 5) and two prefill chunks (positions 2-4 and 0-5)."""
    tables = [[4], [0, 7, 2], [9, 3], [1], [5, 6]]
    starts, lengths = [2, 8, 4, 2, 0], [1, 1, 1, 3, 6]
    upload = StepUpload(torch.device("cpu"))
    positions = [s + i for s, n in zip(starts, lengths, strict=True) for i in range(n)]
    upload.add("positions", positions)
    layout = AttentionPlan.pack(upload, tables, starts, lengths, 3, BLOCK)
    return AttentionPlan.build(layout, upload.upload(), workspace)


@pytest.mark.parametrize("active", [None, [0, 2, 3, 5, 6, 9, 11], [1, 4], [7, 8]])
def test_attention_through_the_workspace_equals_fresh_gathers(active):
    cache = _pool()
    q = torch.randn(12, 4, HD)  # 3 decodes + 3 + 6 prefill tokens, 4 query heads
    rows = None if active is None else torch.tensor(active)
    picked = q if rows is None else q[rows]
    workspace = GatherWorkspace()
    for plane in range(PLANES):
        want = _plan(None).attend(cache, plane, rows, picked)
        got = _plan(workspace).attend(cache, plane, rows, picked)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert workspace.nbytes > 0


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4), (6, 1)])
def test_grouped_decode_attention_equals_sdpa_with_repeated_kv_heads(heads, kv_heads):
    """Each kv head's query group as its query positions gives what enable_gqa does (query
    head h reads kv head h // G), with each row's own number of valid keys."""
    torch.manual_seed(0)
    rows, keys, hd = 5, 40, 16
    q = torch.randn(rows, heads, hd)
    kv = torch.randn(rows, keys, 2, kv_heads, hd)
    k, v = kv[:, :, 0], kv[:, :, 1]  # strided views, as the gather gives them
    valid = torch.arange(keys)[None, :] < torch.tensor([1, 7, 16, 33, 40])[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=valid[:, None, None, :], enable_gqa=True).flatten(1)
    torch.testing.assert_close(decode_attention(q, k, v, valid), want, rtol=1e-5, atol=1e-6)
