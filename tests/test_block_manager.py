"""BlockManager: exact block ids, reference counts, prefix hits and eviction order."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager

EXTRA = (0.1, 3)


def test_allocate_and_free_exact_ids():
    bm = BlockManager(num_blocks=6, block_size=4)
    assert bm.allocate("a", 5)  # 2 blocks
    assert bm.tables["a"] == [0, 1]
    assert bm.allocate("a", 8) and bm.tables["a"] == [0, 1]  # still fits
    assert bm.allocate("a", 9) and bm.tables["a"] == [0, 1, 2]
    assert bm.allocate("b", 4) and bm.tables["b"] == [3]
    assert bm.num_free_blocks == 2
    assert not bm.allocate("b", 13)  # needs 3 more, only 2 free: nothing changes
    assert bm.tables["b"] == [3] and bm.num_free_blocks == 2
    bm.check_integrity()
    bm.free("a")
    assert bm.num_free_blocks == 5 and "a" not in bm.tables
    # uncached blocks are reused first, the request's first block last of them
    assert bm.allocate("c", 4) and bm.tables["c"] == [0]
    bm.check_integrity()


def test_prefix_hit_shares_blocks_and_counts_references():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    assert bm.match_prefix("a", tokens, EXTRA) == 0
    bm.allocate("a", 10)
    bm.cache_full_blocks("a", tokens, 10, EXTRA)
    assert bm.match_prefix("b", tokens + [99], EXTRA) == 8
    assert bm.tables["b"] == bm.tables["a"][:2]
    assert [bm.blocks[i].ref_count for i in bm.tables["a"]] == [2, 2, 1]
    bm.check_integrity()
    bm.free("a")
    assert [bm.blocks[i].ref_count for i in bm.tables["b"]] == [1, 1]
    bm.check_integrity()
    assert bm.prefix_queries == 16 and bm.prefix_hits == 8  # a missed, b hit


def test_at_least_one_token_is_left_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(8))
    bm.match_prefix("a", tokens, EXTRA)
    bm.allocate("a", 8)
    bm.cache_full_blocks("a", tokens, 8, EXTRA)
    bm.free("a")
    assert bm.match_prefix("b", tokens, EXTRA) == 4  # the last block is recomputed
    bm.check_integrity()


def test_extra_keys_separate_cache_entries():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    bm.match_prefix("a", tokens, EXTRA)
    bm.allocate("a", 9)
    bm.cache_full_blocks("a", tokens, 9, EXTRA)
    assert bm.match_prefix("b", tokens, (0.2, 3)) == 0
    assert bm.match_prefix("c", tokens, (0.1, 2)) == 0
    assert bm.match_prefix("d", tokens, EXTRA) == 8
    bm.check_integrity()


def test_freed_cached_blocks_are_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    for name, tokens in (("a", [1, 2, 3, 4]), ("b", [5, 6, 7, 8])):
        bm.match_prefix(name, tokens + [0], EXTRA)
        bm.allocate(name, 4)
        bm.cache_full_blocks(name, tokens, 4, EXTRA)
    assert bm.tables == {"a": [0, 1], "b": [2, 3]}
    bm.free("a")  # queue: 1 (tail of a), 0
    bm.free("b")  # queue: 1, 0, 3, 2
    assert list(bm._free) == [1, 0, 3, 2]
    assert bm.allocate("c", 2) and bm.tables["c"] == [1]  # evicts a's second block
    # a's first block is still cached; its second is gone
    assert bm.match_prefix("d", [1, 2, 3, 4, 0], EXTRA) == 2
    assert bm.tables["d"] == [0]
    # b is still fully cached
    assert bm.match_prefix("e", [5, 6, 7, 8, 0], EXTRA) == 4
    assert bm.tables["e"] == [2, 3]
    bm.check_integrity()


def test_integrity_check_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 4)
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


def test_hash_collision_is_a_miss():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.match_prefix("a", [1, 2, 3], EXTRA)
    bm.allocate("a", 3)
    bm.cache_full_blocks("a", [1, 2, 3], 2, EXTRA)
    block = bm.blocks[bm.tables["a"][0]]
    block.token_ids = (7, 7)  # pretend another token list produced the same hash
    assert bm.match_prefix("b", [1, 2, 3], EXTRA) == 0
    bm.check_integrity()
