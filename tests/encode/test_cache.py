"""EmbeddingCache: LRU order, byte budget, refresh and oversize entries."""

from __future__ import annotations

import pytest
import torch

from services.encode.cache import CacheEntry, CacheKey, EmbeddingCache


def _entry(rows: int, width: int = 4) -> CacheEntry:
    return CacheEntry(torch.randn(rows, width), (1, 2, 2 * rows))


def _key(name: str) -> CacheKey:
    return CacheKey(name, 1024, 65536)


def test_evicts_least_recently_used_within_budget():
    cache = EmbeddingCache(capacity_bytes=3 * 16)  # three 1x4 fp32 entries
    for name in "abc":
        assert cache.put(_key(name), _entry(1))
    assert cache.get(_key("a")) is not None  # a is now the most recent; b is the oldest
    cache.put(_key("d"), _entry(1))
    assert _key("b") not in cache
    assert all(_key(n) in cache for n in "acd")
    assert cache.nbytes == 3 * 16 and len(cache) == 3


def test_large_entry_evicts_several_and_oversize_is_refused():
    cache = EmbeddingCache(capacity_bytes=4 * 16)
    for name in "abcd":
        cache.put(_key(name), _entry(1))
    assert cache.put(_key("big"), _entry(3))  # needs 3 slots: a, b, c go
    assert [n for n in "abcd" if _key(n) in cache] == ["d"]
    assert not cache.put(_key("huge"), _entry(5))
    assert _key("huge") not in cache and cache.nbytes == 4 * 16


def test_refresh_replaces_without_double_counting():
    cache = EmbeddingCache(capacity_bytes=1024)
    cache.put(_key("a"), _entry(2))
    replacement = _entry(1)
    cache.put(_key("a"), replacement)
    assert cache.nbytes == 16 and cache.get(_key("a")) is replacement


def test_key_includes_pixel_bounds_and_zero_capacity_disables():
    cache = EmbeddingCache(capacity_bytes=1024)
    cache.put(CacheKey("h", 1024, 65536), _entry(1))
    assert cache.get(CacheKey("h", 1024, 4096)) is None
    disabled = EmbeddingCache(capacity_bytes=0)
    assert not disabled.put(_key("a"), _entry(1)) and len(disabled) == 0
    with pytest.raises(ValueError, match="capacity"):
        EmbeddingCache(capacity_bytes=-1)
