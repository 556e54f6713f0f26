"""Grouping prefill chunks into padded attention calls (engine/prefill_groups.py): the
bound on padding, coverage, and a group's call against each chunk attended to alone."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from engine.prefill_groups import PrefillGroup, attend_group, group_prefills


def padded_over_real(group: list[int], counts: list[int], widths: list[int]) -> float:
    real = sum(counts[i] * widths[i] for i in group)
    return len(group) * max(counts[i] for i in group) * max(widths[i] for i in group) / real


@pytest.mark.parametrize("seed", range(20))
def test_every_chunk_once_and_no_group_pads_more_than_twice(seed):
    rng = random.Random(seed)
    size = rng.randint(1, 80)
    widths = [rng.randint(1, 64) for _ in range(size)]
    counts = [rng.choice((0, rng.randint(1, 16 * w))) for w in widths]
    groups = group_prefills(counts, widths)
    members = sorted(i for g in groups for i in g)
    assert members == [i for i, n in enumerate(counts) if n > 0]
    for g in groups:
        assert g == sorted(g)
        assert padded_over_real(g, counts, widths) <= 2.0


def test_counts_within_a_factor_of_two_share_one_call():
    # a compacted step over 64 prompts of one length: 5-10 of each chunk's 32 tokens loop
    counts = [5 + i % 6 for i in range(64)]
    assert group_prefills(counts, [2] * 64) == [list(range(64))]
    # and the masked form's prompts of similar length: one call, as before
    assert group_prefills([20, 22, 24], [5, 6, 6]) == [[0, 1, 2]]


def test_a_chunk_unlike_the_others_is_left_alone():
    # one query at a long context (a chunk near the end of a long prompt) and a new prompt
    assert group_prefills([1, 64], [100, 16]) == [[1], [0]]
    assert group_prefills([0, 0], [3, 4]) == []


def chunk_attention(q, k, v, positions):
    """One chunk by itself: q [a, H, hd] at positions [a] over k, v [C, Hkv, hd]."""
    mask = torch.arange(k.shape[0])[None, :] <= positions[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask[None, None], enable_gqa=True)
    return out[0].transpose(0, 1).flatten(1)


@pytest.mark.parametrize("members", [[0, 1, 2], [0, 2], [1]])
def test_a_group_call_equals_each_chunk_alone(members):
    """Three chunks after 2 decode rows: their queries (some halted, as a compacted step
    has them) at their positions, over contexts of 9, 4 and 12 keys (block size 4)."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, hd, bs = 4, 2, 8, 4
    contexts, counts = [9, 4, 12], [3, 1, 5]
    widths = [-(-c // bs) for c in contexts]
    bounds = [2, 5, 6, 11]  # chunk i's queries: [bounds[i], bounds[i+1]) of the call's
    keys = [torch.randn(c, 2, kv_heads, hd, generator=gen) for c in contexts]
    positions = torch.tensor([0, 0, 2, 5, 8, 3, 1, 4, 7, 10, 11])  # decodes' unused
    q = torch.randn(bounds[-1], heads, hd, generator=gen)
    pool_blocks = torch.arange(sum(widths)).split(widths)
    all_blocks = torch.zeros(3, max(widths), dtype=torch.long)
    for i, blocks in enumerate(pool_blocks):
        all_blocks[i, :len(blocks)] = blocks
    group = PrefillGroup.layout(members, bounds, widths, all_blocks)
    assert group.longest == max(counts[i] for i in members)
    rows = (torch.arange(bounds[0], bounds[-1]) if group.rows is None else group.rows)
    width = max(widths[i] for i in members) * bs
    k = torch.zeros(len(members), width, kv_heads, hd)
    v = torch.zeros_like(k)
    for slot, i in enumerate(members):
        k[slot, :contexts[i]], v[slot, :contexts[i]] = keys[i][:, 0], keys[i][:, 1]
    got = attend_group(group, q[rows], positions[rows], k, v)
    want = torch.cat([chunk_attention(q[bounds[i]:bounds[i + 1]], keys[i][:, 0],
                                      keys[i][:, 1], positions[bounds[i]:bounds[i + 1]])
                      for i in members])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(group.blocks, all_blocks[members][:, :max(widths[i] for i in members)])
