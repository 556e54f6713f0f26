"""BlockManager: exact block ids, reference counts, prefix hits, eviction order, the
side-effect-free lookup, all-or-nothing allocation and forks."""

from __future__ import annotations

import copy

import pytest

from engine.block_manager import BlockCopy, BlockManager
from engine.sampling_params import SamplingParams
from tests.helpers import make_request


def computed(bm: BlockManager, request, num_new: int | None = None) -> list[int]:
    """Look up, then allocate the hits plus the rest of the request's tokens; compute them
    all and register the full blocks (what one scheduler step does)."""
    hits = bm.computed_blocks(request)
    cached = len(hits) * bm.block_size
    num_new = request.num_tokens - cached if num_new is None else num_new
    assert bm.allocate(request, num_new, hits)
    request.num_computed_tokens = cached + num_new
    bm.cache_full_blocks(request)
    return hits


def state(bm: BlockManager):
    return copy.deepcopy((bm.blocks, list(bm._free), bm._cached, bm.tables, bm._num_cached,
                          bm.prefix_queries, bm.prefix_hits))


def test_allocate_and_free_exact_ids():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = make_request("a", 5), make_request("b", 4)
    assert bm.allocate(a, 5) and bm.tables["a"] == [0, 1]
    a.num_computed_tokens = 5
    assert bm.allocate(a, 3) and bm.tables["a"] == [0, 1]  # 8 still fit
    assert bm.allocate(a, 4) and bm.tables["a"] == [0, 1, 2]
    assert bm.allocate(b, 4) and bm.tables["b"] == [3]
    assert bm.num_free_blocks == 2
    b.num_computed_tokens = 4
    assert not bm.allocate(b, 9)  # needs 3 more, only 2 free: nothing changes
    assert bm.tables["b"] == [3] and bm.num_free_blocks == 2
    bm.check_integrity()
    bm.free("a")
    assert bm.num_free_blocks == 5 and "a" not in bm.tables
    # uncached blocks are reused first, the request's first block last of them
    assert bm.allocate(make_request("c", 4), 4) and bm.tables["c"] == [0]
    bm.check_integrity()


def test_lookup_has_no_side_effects_and_a_failed_allocation_changes_nothing():
    bm = BlockManager(num_blocks=6, block_size=4)
    c = make_request("c", list(range(8)) + [99])
    computed(bm, c)
    bm.free("c")  # its two full blocks stay cached, free
    before = state(bm)
    b = make_request("b", list(range(8)) + [7] * 20)  # 7 blocks: more than the pool
    hits = bm.computed_blocks(b)
    assert len(hits) == 2
    assert state(bm) == before  # the lookup took nothing
    assert not bm.allocate(b, b.num_tokens - 8, hits)  # 2 hits + 5 new > 6 free
    assert state(bm) == before  # and neither did the failed allocation
    bm.check_integrity()


def test_prefix_hit_shares_blocks_and_counts_references():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_request("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert computed(bm, a) == []
    b = make_request("b", list(range(10)) + [99])
    assert computed(bm, b) == bm.tables["a"][:2]
    assert bm.tables["b"][:2] == bm.tables["a"][:2]
    assert [bm.blocks[i].ref_count for i in bm.tables["a"]] == [2, 2, 1]
    bm.check_integrity()
    bm.free("a")
    assert [bm.blocks[i].ref_count for i in bm.tables["b"]] == [1, 1, 1]
    bm.check_integrity()
    assert bm.prefix_queries == 16 and bm.prefix_hits == 8  # a missed, b hit


def test_at_least_one_token_is_left_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    computed(bm, make_request("a", list(range(8))))
    bm.free("a")
    hits = bm.computed_blocks(make_request("b", list(range(8))))
    assert len(hits) == 1  # the last block is recomputed
    bm.check_integrity()


def test_extra_keys_separate_cache_entries():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    computed(bm, make_request("a", tokens))
    assert bm.computed_blocks(make_request("b", tokens, halt_threshold=0.2)) == []
    assert bm.computed_blocks(make_request("c", tokens, max_loops=2)) == []
    assert len(bm.computed_blocks(make_request("d", tokens))) == 2
    bm.check_integrity()


def test_hashes_grow_with_the_tokens():
    request = make_request("a", list(range(6)))
    assert len(request.block_hashes) == 1
    request.append_token(1)
    assert len(request.block_hashes) == 1
    request.append_token(2)
    assert len(request.block_hashes) == 2
    same = make_request("b", list(range(6)) + [1, 2])
    assert same.block_hashes == request.block_hashes


def test_freed_cached_blocks_are_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    for name, tokens in (("a", [1, 2, 3, 4]), ("b", [5, 6, 7, 8])):
        computed(bm, make_request(name, tokens + [0], block_size=2), num_new=4)
    assert bm.tables == {"a": [0, 1], "b": [2, 3]}
    bm.free("a")  # queue: 1 (tail of a), 0
    bm.free("b")  # queue: 1, 0, 3, 2
    assert list(bm._free) == [1, 0, 3, 2]
    # c evicts the second block of a
    assert bm.allocate(make_request("c", 2, block_size=2), 2) and bm.tables["c"] == [1]
    # a's first block is still cached; its second is gone
    assert bm.computed_blocks(make_request("d", [1, 2, 3, 4, 0], block_size=2)) == [0]
    # b is still fully cached
    assert bm.computed_blocks(make_request("e", [5, 6, 7, 8, 0], block_size=2)) == [2, 3]
    bm.check_integrity()


def test_a_hit_on_a_free_block_counts_against_the_free_pool():
    bm = BlockManager(num_blocks=3, block_size=2)
    computed(bm, make_request("a", [1, 2, 3, 4, 5], block_size=2), num_new=4)
    bm.free("a")  # blocks 0, 1 cached and free; 2 free
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7], block_size=2)
    hits = bm.computed_blocks(b)
    assert hits == [0, 1]
    assert not bm.allocate(b, 3, hits)  # 2 hits + 2 new > 3 free: it must not evict a hit
    assert bm.allocate(b, 2, hits) and bm.tables["b"] == [0, 1, 2]
    bm.check_integrity()


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(num_blocks=8, block_size=4)
    leader = make_request("p#0", list(range(10)))
    computed(bm, leader)
    choice = make_request("p#1", list(range(10)), index=1, parent="p")
    copy_op = bm.fork(leader, choice, leader.prompt_len)
    assert bm.tables["p#1"][:2] == bm.tables["p#0"][:2]
    assert copy_op == BlockCopy(src=bm.tables["p#0"][2], dst=bm.tables["p#1"][2])
    assert [bm.blocks[i].ref_count for i in bm.tables["p#0"]] == [2, 2, 1]
    bm.check_integrity()
    aligned = make_request("q#0", list(range(8)))
    computed(bm, aligned)
    assert bm.fork(aligned, make_request("q#1", list(range(8)), index=1, parent="q"),
                   8) is None  # nothing partial to copy
    bm.check_integrity()


def test_a_fork_without_a_free_block_changes_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    leader = make_request("p#0", list(range(10)))
    computed(bm, leader)
    before = state(bm)
    assert bm.fork(leader, make_request("p#1", list(range(10))), 10) is False
    assert state(bm) == before
    bm.check_integrity()


def test_integrity_check_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate(make_request("a", 4, SamplingParams(), block_size=2), 4)
    bm.blocks[0].ref_count = 2
    with pytest.raises(AssertionError, match="block 0 has ref_count 2 but 1 owners"):
        bm.check_integrity()
    bm.blocks[0].ref_count = 1
    bm.tables["b"] = [1]  # a block owned twice without its count
    with pytest.raises(AssertionError, match="block 1"):
        bm.check_integrity()
    del bm.tables["b"]
    bm._free[0] = None  # an owned block on the free list
    with pytest.raises(AssertionError, match="block 0"):
        bm.check_integrity()
