"""Embedding cache: packed vision outputs keyed by image content, least recently used out first."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheKey:
    """What determines an image's embeddings: its bytes (sha256 hex) and the resize bounds."""

    content_hash: str
    min_pixels: int
    max_pixels: int
    video: str = ""  # a video's sampling options (VideoSampling.key()); empty for an image


@dataclass(frozen=True)
class CacheEntry:
    """One image's packed embeddings [num_tokens, (1+k)*H] and its grid (t, h, w) in patches."""

    packed: torch.Tensor
    grid_thw: tuple[int, int, int]
    timestamps: tuple[float, ...] = ()  # a video's group times

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.packed)


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class EmbeddingCache:
    """An LRU map CacheKey -> CacheEntry, bounded by the total bytes of the packed tensors.

    Used from the event loop thread only, so it takes no lock. Entries are the tensors the vision
    tower produced (on its device); callers must not modify them in place.
    """

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[CacheKey, CacheEntry] = OrderedDict()
        self._nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def get(self, key: CacheKey) -> CacheEntry | None:
        """The cached entry (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: CacheKey, entry: CacheEntry) -> bool:
        """Insert (or refresh) an entry, evicting the least recently used ones to fit.

        Returns False, caching nothing, when the entry alone exceeds the capacity.
        """
        size = entry.nbytes
        if size > self.capacity_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self._nbytes -= old.nbytes
        while self._entries and self._nbytes + size > self.capacity_bytes:
            evicted_key, evicted = self._entries.popitem(last=False)
            self._nbytes -= evicted.nbytes
            log.debug("cache evicted %s (%d bytes)", evicted_key.content_hash[:12], evicted.nbytes)
        self._entries[key] = entry
        self._nbytes += size
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._nbytes = 0
