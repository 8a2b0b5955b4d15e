"""KV cache blocks as the scheduler sees them: the block allocator and prefix-cache hashing (the
tensors themselves are the runner's pool, `runner.kv_pool`).

Blocks hold ``block_size`` consecutive tokens of one sequence. A full block whose K/V has been
computed is registered under a chained hash of everything before and in it, so a later sequence
with the same prefix (same text, same images) reuses it instead of recomputing. Blocks nobody
references stay cached until the allocator needs them, least recently used first.
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_right
from collections import OrderedDict
from itertools import accumulate

from services.language.engine.request import RequestState
from services.language.runner.kv_pool import KVCacheConfigError

_ROOT_HASH = b"splitvl-kv-v1"


def hash_block(parent: bytes, token_ids: list[int], extra: str) -> bytes:
    """Chained hash of one full block: the parent's hash, its token ids and its image keys."""
    digest = hashlib.sha256(parent)
    digest.update(array("q", token_ids).tobytes())
    digest.update(extra.encode())
    return digest.digest()


def _image_keys(seq: RequestState, start: int, end: int) -> str:
    """Key of the image rows placed in prompt indices [start, end).

    Image pads are one token id for every image, so the pad ids alone would let two requests
    with the same text but different images share blocks. Each image overlapping the block adds
    its content hash and the first of its rows in the block.
    """
    lo, hi = seq.image_rows(start, end)
    if lo == hi:
        return ""
    sizes = [image.num_tokens for image in seq.request.images]
    starts = [0, *accumulate(sizes)]
    keys = []
    row = lo
    while row < hi:
        index = bisect_right(starts, row) - 1
        keys.append(f"{seq.request.images[index].content_hash}@{row - starts[index]}")
        row = min(hi, starts[index + 1])
    return "|".join(keys)


def update_block_hashes(seq: RequestState, block_size: int) -> None:
    """Extend ``seq.block_hashes`` to cover every full block of its current tokens."""
    num_full = seq.num_tokens // block_size
    for index in range(len(seq.block_hashes), num_full):
        start, end = index * block_size, (index + 1) * block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else _ROOT_HASH
        extra = _image_keys(seq, start, end) if seq.has_images else ""
        seq.block_hashes.append(hash_block(parent, seq.token_ids[start:end], extra))


class BlockManager:
    """Allocates KV blocks to sequences and keeps the prefix cache over full blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise KVCacheConfigError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        # Unreferenced blocks; the front is reused first, so cached blocks go to the back.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def lookup_prefix(self, seq: RequestState) -> list[int]:
        """Cached blocks matching the longest full-block prefix of ``seq`` (not yet referenced).

        At least the last token is always left out: its logits are needed to sample.
        """
        if not self.enable_prefix_caching:
            return []
        update_block_hashes(seq, self.block_size)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        blocks = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block = self._cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one prefix lookup that led to an allocation (failed attempts are retried)."""
        if self.enable_prefix_caching:
            self.prefix_cache_queries += num_tokens
            self.prefix_cache_hits += num_hit_tokens

    def allocate(
        self, seq: RequestState, num_new_tokens: int, cached_blocks: list[int] = ()
    ) -> bool:
        """Give ``seq`` blocks for ``cached_blocks`` plus ``num_new_tokens`` more tokens.

        ``cached_blocks`` (from :meth:`lookup_prefix`, only for a sequence holding no blocks)
        become the start of its block table and count as computed. Returns False, changing
        nothing, when the free pool is too small.
        """
        num_computed = seq.num_computed_tokens + len(cached_blocks) * self.block_size
        num_held = len(seq.block_ids) + len(cached_blocks)
        num_new_blocks = max(0, self.blocks_needed(num_computed + num_new_tokens) - num_held)
        num_revived = sum(1 for b in cached_blocks if self._ref_counts[b] == 0)
        if num_new_blocks > len(self._free) - num_revived:
            return False
        for block in cached_blocks:
            if self._ref_counts[block] == 0:
                del self._free[block]
            self._ref_counts[block] += 1
        seq.block_ids.extend(cached_blocks)
        seq.num_computed_tokens = num_computed
        if cached_blocks:  # they are in the cache already; blocks held before are not all full
            seq.num_registered_blocks = len(seq.block_ids)
        for _ in range(num_new_blocks):
            seq.block_ids.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)
        old_hash = self._block_hash[block]
        if old_hash is not None:
            # Evicting: the block's old content is about to be overwritten.
            if self._cached.get(old_hash) == block:
                del self._cached[old_hash]
            self._block_hash[block] = None
        self._ref_counts[block] = 1
        return block

    def register_computed_blocks(self, seq: RequestState) -> None:
        """Offer the full blocks of ``seq`` whose K/V is now computed to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        if num_full <= seq.num_registered_blocks:
            return
        update_block_hashes(seq, self.block_size)
        for index in range(seq.num_registered_blocks, num_full):
            block_hash = seq.block_hashes[index]
            block = seq.block_ids[index]
            # Another sequence may have computed the same block first; keep that one.
            if block_hash not in self._cached and self._block_hash[block] is None:
                self._cached[block_hash] = block
                self._block_hash[block] = block_hash
        seq.num_registered_blocks = num_full

    def free(self, seq: RequestState) -> None:
        """Release every block of ``seq`` and reset its computed state."""
        # Tail blocks first, so the shared head of a prefix is evicted last.
        for block in reversed(seq.block_ids):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None
                if self._block_hash[block] is None:
                    self._free.move_to_end(block, last=False)
        seq.block_ids = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence references."""
        for block_hash, block in list(self._cached.items()):
            if self._ref_counts[block] == 0:
                del self._cached[block_hash]
                self._block_hash[block] = None
