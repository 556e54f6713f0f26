"""Hash chain of a request's full KV blocks: H(parent hash, token ids, extra keys).

blake2b (128 bits) makes a collision between two different prefixes negligible, so a hit is
trusted without comparing tokens. The extra keys are what besides the tokens changes the
cached k/v: the request's halt_threshold and max_loops.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Sequence

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple
               ) -> BlockHash:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent or b"root")
    digest.update(struct.pack("<q", len(token_ids)))
    digest.update(array("q", token_ids).tobytes())
    digest.update(repr(extra_keys).encode())
    return digest.digest()


def extend_hashes(hashes: list[BlockHash], token_ids: Sequence[int], block_size: int,
                  extra_keys: tuple) -> None:
    """Append to `hashes` the hash of every full block of `token_ids` it does not cover."""
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, token_ids[start:start + block_size], extra_keys))
