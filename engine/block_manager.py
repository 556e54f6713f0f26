"""Paged KV block manager: block tables, reference counts, hash-chained prefix caching.

One block covers `block_size` token positions for every (layer, loop step) plane, so one
block table per request is all the scheduler needs. A block that is full of computed tokens
is hashed as H(parent hash, token ids, extra keys) — the extra keys carry the request's
halt_threshold and max_loops, which change the cached k/v — and stays findable after its
last owner frees it, until the allocator reuses it (least recently freed first).

This module never touches tensors; the runner owns the KV memory.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence

BlockHash = int


@dataclasses.dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] = ()  # the tokens the hash covers (checked on a hit)
    parent_hash: BlockHash | None = None
    extra_keys: tuple = ()


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple
               ) -> BlockHash:
    """Chained block hash; collisions are caught by comparing tokens on a hit."""
    return hash((parent, tuple(token_ids), extra_keys))


class BlockManager:
    """Allocates KV blocks to requests; `check_integrity` verifies every invariant."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
                 ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # free blocks in eviction order: least recently freed first
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}  # block hash -> block id
        self.tables: dict[str, list[int]] = {}  # request id -> block table
        self._hashed_count: dict[str, int] = {}  # request id -> leading blocks already hashed
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks owned by some request (cached free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """New blocks `request_id` needs so that its table covers `num_tokens` positions."""
        have = len(self.tables.get(request_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(request_id, num_tokens) <= len(self._free)

    # ------------------------------------------------------------------ prefix cache
    def block_hashes(self, token_ids: Sequence[int], extra_keys: tuple) -> list[BlockHash]:
        """Hashes of every full block of `token_ids`."""
        hashes: list[BlockHash] = []
        parent = None
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            parent = hash_block(parent, token_ids[start:start + self.block_size], extra_keys)
            hashes.append(parent)
        return hashes

    def match_prefix(self, request_id: str, token_ids: Sequence[int], extra_keys: tuple) -> int:
        """Give a new request the cached blocks of its longest cached prefix.

        Returns the number of tokens they cover. At least one token is always left to
        compute, so the request still produces logits for its next token."""
        if request_id in self.tables:
            raise ValueError(f"request {request_id} already holds blocks")
        self.tables[request_id] = []
        self._hashed_count[request_id] = 0
        if not self.enable_prefix_caching:
            return 0
        limit = (len(token_ids) - 1) // self.block_size  # full blocks before the last token
        self.prefix_queries += limit * self.block_size
        hits = self._cached_chain(token_ids, extra_keys, limit)
        for block_id in hits:
            self._take(block_id)
        self.tables[request_id] = hits
        self._hashed_count[request_id] = len(hits)
        self.prefix_hits += len(hits) * self.block_size
        return len(hits) * self.block_size

    def _cached_chain(self, token_ids: Sequence[int], extra_keys: tuple, limit: int) -> list[int]:
        hits: list[int] = []
        parent = None
        for i in range(limit):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_hash = hash_block(parent, tokens, extra_keys)
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if (block.token_ids, block.parent_hash, block.extra_keys) != (
                    tokens, parent, extra_keys):
                break  # a hash collision: treat as a miss
            hits.append(block_id)
            parent = block_hash
        return hits

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed: int,
                          extra_keys: tuple) -> None:
        """Register the request's blocks that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[request_id]
        done = self._hashed_count[request_id]
        full = min(num_computed // self.block_size, len(table))
        parent = self.blocks[table[done - 1]].block_hash if done else None
        for i in range(done, full):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            block_hash = hash_block(parent, tokens, extra_keys)
            block = self.blocks[table[i]]
            block.block_hash, block.token_ids = block_hash, tokens
            block.parent_hash, block.extra_keys = parent, extra_keys
            self._cached.setdefault(block_hash, block.block_id)
            parent = block_hash
        self._hashed_count[request_id] = max(done, full)

    # ------------------------------------------------------------------ allocate / free
    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's table to cover `num_tokens` positions; False if blocks run out
        (then nothing changes)."""
        if request_id not in self.tables:
            self.tables[request_id] = []
            self._hashed_count[request_id] = 0
        needed = self.blocks_needed(request_id, num_tokens)
        if needed > len(self._free):
            return False
        table = self.tables[request_id]
        for _ in range(needed):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self.blocks[block_id].ref_count = 1
            table.append(block_id)
        return True

    def free(self, request_id: str) -> None:
        """Release every block of the request. Tail blocks are queued for reuse before the
        prefix blocks, which other requests are likelier to share."""
        table = self.tables.pop(request_id, None)
        self._hashed_count.pop(request_id, None)
        if table is None:
            return
        for block_id in reversed(table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free[block_id] = None
                    self._free.move_to_end(block_id, last=False)  # uncached: reuse first
                else:
                    self._free[block_id] = None

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None and self._cached.get(block.block_hash) == block_id:
            del self._cached[block.block_hash]
        block.block_hash, block.token_ids, block.parent_hash, block.extra_keys = None, (), None, ()

    def reset_prefix_cache(self) -> None:
        for block_id in list(self._free):
            self._evict(block_id)

    # ------------------------------------------------------------------ integrity
    def check_integrity(self) -> None:
        """Raise AssertionError naming the first broken invariant: every block is either
        owned (ref_count = number of tables holding it, not free) or free exactly once;
        cached hashes point at blocks carrying that hash."""
        owners: dict[int, int] = {}
        for request_id, table in self.tables.items():
            if len(set(table)) != len(table):
                raise AssertionError(f"request {request_id} holds a block twice: {table}")
            for block_id in table:
                owners[block_id] = owners.get(block_id, 0) + 1
        for block in self.blocks:
            owned = owners.get(block.block_id, 0)
            if block.ref_count != owned:
                raise AssertionError(f"block {block.block_id} has ref_count {block.ref_count} "
                                     f"but {owned} owners")
            if (owned == 0) != (block.block_id in self._free):
                raise AssertionError(f"block {block.block_id}: owned by {owned} requests, "
                                     f"free={block.block_id in self._free}")
        if len(self._free) + len(owners) != self.num_blocks:
            raise AssertionError("free and owned blocks do not add up to the pool")
        for block_hash, block_id in self._cached.items():
            if self.blocks[block_id].block_hash != block_hash:
                raise AssertionError(f"cached hash points at block {block_id} with another hash")
        for request_id, count in self._hashed_count.items():
            if count > len(self.tables[request_id]):
                raise AssertionError(f"request {request_id} hashed past its table")
