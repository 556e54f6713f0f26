"""Paged KV block manager: block tables, reference counts, hash-chained prefix caching.

One block covers `block_size` token positions for every (layer, loop step) plane, so one
block table per request is all the scheduler needs. The contract is vLLM v1's (and
nano-vllm's):

- `computed_blocks(request)` finds the request's longest cached prefix and changes nothing;
- `allocate(request, num_new_tokens, hits)` takes those hits *and* the new blocks the
  request needs, or returns False and changes nothing;
- `cache_full_blocks(request)` registers blocks that are now full of computed tokens under
  the request's own hash chain (`Request.block_hashes`, which already carries the
  halt_threshold and max_loops that change the cached k/v); a cached block stays findable
  after its last owner frees it, until the allocator reuses it (least recently freed first);
- `fork(parent, child)` gives a choice of an n > 1 request the parent's full prompt blocks
  by reference and a copy of its last partial block (the runner copies the data).

This module never touches tensors; the runner owns the KV memory.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from engine.block_hash import BlockHash
from engine.request import Request


@dataclasses.dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


@dataclasses.dataclass(frozen=True)
class BlockCopy:
    """Copy every plane of KV block `src` into block `dst` before the next step runs."""

    src: int
    dst: int


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
        self._num_cached: dict[str, int] = {}  # request id -> leading blocks registered
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks owned by some request (cached free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_to_cover(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def computed_blocks(self, request: Request) -> list[int]:
        """The cached blocks of the request's longest cached prefix. No side effects.

        At least one token is always left to compute, so that the request still produces
        logits for its next token. A request that asks for prompt logprobs takes no hits."""
        if not self.enable_prefix_caching or request.request_id in self.tables:
            return []
        if request.params.prompt_logprobs is not None:
            return []  # every prompt position must be computed to yield its logprob
        limit = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        for block_hash in request.block_hashes[:limit]:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    # ------------------------------------------------------------------ allocate / free
    def allocate(self, request: Request, num_new_tokens: int, hits: list[int] | None = None
                 ) -> bool:
        """Give the request `hits` (from `computed_blocks`, only before its first
        allocation) and enough new blocks for its computed tokens plus `num_new_tokens`.
        All or nothing: False when the pool cannot hold it, and then nothing changed."""
        hits = hits or []
        table = self.tables.get(request.request_id)
        have = len(table) if table is not None else len(hits)
        computed = request.num_computed_tokens if table is not None else (
            len(hits) * self.block_size)
        needed = max(0, self.blocks_to_cover(computed + num_new_tokens) - have)
        taken_from_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if needed + taken_from_free > len(self._free):
            return False
        if table is None:
            table = self.tables[request.request_id] = []
            self._num_cached[request.request_id] = len(hits)
            self._count_lookup(request, len(hits))
        for block_id in hits:
            self._take(block_id)
            table.append(block_id)
        for _ in range(needed):
            table.append(self._pop_free())
        return True

    def _count_lookup(self, request: Request, num_hits: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_queries += (request.num_tokens - 1) // self.block_size * self.block_size
            self.prefix_hits += num_hits * self.block_size

    def fork(self, parent: Request, child: Request, num_tokens: int) -> BlockCopy | None | bool:
        """Share the parent's full blocks of its first `num_tokens` positions with `child`
        (which holds none yet). A partial last block is copied into a new block: the
        returned `BlockCopy` says which; None when there was none to copy. False when no
        block is free for the copy (then nothing changed)."""
        source = self.tables[parent.request_id][:self.blocks_to_cover(num_tokens)]
        full = num_tokens // self.block_size
        partial = len(source) > full
        if partial and not self._free:
            return False
        table = self.tables[child.request_id] = []
        self._num_cached[child.request_id] = min(full, self._num_cached[parent.request_id])
        for block_id in source[:full]:
            self._take(block_id)
            table.append(block_id)
        if not partial:
            return None
        table.append(self._pop_free())
        return BlockCopy(src=source[full], dst=table[-1])

    def free(self, request_id: str) -> None:
        """Release every block of the request. Tail blocks are queued for reuse before the
        prefix blocks, which other requests are likelier to share."""
        table = self.tables.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        if table is None:
            return
        for block_id in reversed(table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)  # uncached: reuse first

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None and self._cached.get(block.block_hash) == block_id:
            del self._cached[block.block_hash]
        block.block_hash = None
        block.ref_count = 1
        return block_id

    # ------------------------------------------------------------------ prefix cache
    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[request.request_id]
        done = self._num_cached[request.request_id]
        full = min(request.num_computed_tokens // self.block_size, len(table),
                   len(request.block_hashes))
        for i in range(done, full):
            block = self.blocks[table[i]]
            block_hash = request.block_hashes[i]
            if block.block_hash is None and block_hash not in self._cached:
                block.block_hash = block_hash  # a twin computed elsewhere stays unhashed
                self._cached[block_hash] = block.block_id
        self._num_cached[request.request_id] = max(done, full)

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
        for request_id, count in self._num_cached.items():
            if count > len(self.tables[request_id]):
                raise AssertionError(f"request {request_id} cached past its table")
