"""Block allocation, prefix hashing with images, LRU eviction and the preallocated pool."""

from __future__ import annotations

import pytest
import torch

from services.language.engine.kv_blocks import BlockManager, update_block_hashes
from services.language.runner.kv_pool import KVCache, KVCacheConfigError, KVCacheSpec
from shared.kernels.select import kv_store
from tests.language.conftest import fake_image, make_sequence
from tests.tiny import IMAGE_TOKEN_ID

BS = 4


def _run_prefill(bm: BlockManager, seq) -> list[int]:
    """Admit ``seq`` like the scheduler does, compute its whole prompt, return hit blocks."""
    cached = bm.lookup_prefix(seq)
    assert bm.allocate(seq, seq.num_tokens - len(cached) * BS, cached)
    bm.record_lookup(seq.num_tokens, len(cached) * BS)
    seq.num_computed_tokens = seq.num_tokens
    bm.register_computed_blocks(seq)
    return cached


def test_allocate_and_free_restore_the_pool():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_sequence(list(range(10)))
    assert bm.allocate(seq, 10)
    assert len(seq.block_ids) == 3 and bm.num_free_blocks == 5
    seq.num_computed_tokens = 10
    seq.token_ids += [1, 2, 3]
    assert bm.allocate(seq, 3)  # 13 tokens -> 4 blocks
    assert len(seq.block_ids) == 4
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_ids == [] and seq.num_computed_tokens == 0


def test_allocation_fails_without_side_effects_when_pool_is_short():
    bm = BlockManager(num_blocks=2, block_size=BS)
    seq = make_sequence(list(range(12)))
    assert not bm.allocate(seq, 12)
    assert seq.block_ids == [] and bm.num_free_blocks == 2


def test_identical_prefix_reuses_full_blocks_but_never_the_last_token():
    bm = BlockManager(num_blocks=16, block_size=BS)
    first = make_sequence(list(range(10)))
    assert _run_prefill(bm, first) == []
    second = make_sequence(list(range(10)) + [99, 98])
    hits = _run_prefill(bm, second)
    assert hits == first.block_ids[:2]  # two full blocks; the partial third is not cached
    assert second.block_ids[:2] == first.block_ids[:2]
    # Exactly 8 tokens: only 1 block may hit, the last token must be recomputed for logits.
    exact = make_sequence(list(range(8)))
    assert len(bm.lookup_prefix(exact)) == 1


def test_same_text_different_images_do_not_share_image_blocks():
    bm = BlockManager(num_blocks=32, block_size=BS)
    ids = [1, 2, 3, 4] + [IMAGE_TOKEN_ID] * 8 + [5, 6, 7, 8, 9]
    cat = make_sequence(ids, images=(fake_image(8, "cat"),))
    dog = make_sequence(ids, images=(fake_image(8, "dog"),))
    cat_again = make_sequence(ids, images=(fake_image(8, "cat"),))
    _run_prefill(bm, cat)
    dog_hits = _run_prefill(bm, dog)
    assert dog_hits == cat.block_ids[:1]  # the text-only first block is shared
    assert set(dog.block_ids[1:]).isdisjoint(cat.block_ids)
    assert _run_prefill(bm, cat_again) == cat.block_ids[:4]


def test_image_hash_depends_on_row_offset_within_image():
    # The same image shifted by one token must not reuse blocks keyed by other rows.
    a = make_sequence([1] + [IMAGE_TOKEN_ID] * 8 + [2, 3, 4], images=(fake_image(8, "x"),))
    b = make_sequence([1, 1] + [IMAGE_TOKEN_ID] * 8 + [2, 3], images=(fake_image(8, "x"),))
    update_block_hashes(a, BS)
    update_block_hashes(b, BS)
    assert len(a.block_hashes) == 3
    assert a.block_hashes[0] != b.block_hashes[0]
    assert a.block_hashes[1] != b.block_hashes[1]


def test_a_block_filled_over_several_steps_is_cached_once_full():
    """A chunk that ends mid-block (the prompt waits there for an image, or decoding adds one
    token a step) still caches the block when a later step fills it."""
    bm = BlockManager(num_blocks=8, block_size=BS)
    first = make_sequence(list(range(10)))
    assert bm.allocate(first, 2)  # a chunk of 2 tokens: half of block 0
    first.num_computed_tokens = 2
    bm.register_computed_blocks(first)
    assert bm.allocate(first, 8)  # the rest; block 0 fills now
    first.num_computed_tokens = 10
    bm.register_computed_blocks(first)
    for token in (10, 11):  # decoding fills block 2
        first.token_ids.append(token)
        assert bm.allocate(first, 1)
        first.num_computed_tokens += 1
        bm.register_computed_blocks(first)
    again = make_sequence(list(range(12)) + [99], request_id="again")
    assert len(bm.lookup_prefix(again)) == 3


def test_unreferenced_cached_blocks_are_evicted_least_recently_used():
    bm = BlockManager(num_blocks=5, block_size=BS)
    old = make_sequence([1] * 8 + [0])
    new = make_sequence([2] * 8 + [0])
    _run_prefill(bm, old)
    bm.free(old)
    _run_prefill(bm, new)
    bm.free(new)
    assert bm.num_free_blocks == 5
    # A 9-token sequence needs 3 blocks: an uncached block and `old`'s cached ones go first.
    filler = make_sequence([3] * 9)
    assert bm.allocate(filler, 9)
    assert len(bm.lookup_prefix(make_sequence([2] * 8 + [0]))) == 2
    assert bm.lookup_prefix(make_sequence([1] * 8 + [0])) == []


def test_hit_on_a_free_cached_block_revives_it():
    bm = BlockManager(num_blocks=3, block_size=BS)
    first = make_sequence([7] * 8 + [1])
    _run_prefill(bm, first)
    bm.free(first)
    again = make_sequence([7] * 8 + [2])
    hits = _run_prefill(bm, again)
    assert len(hits) == 2 and bm.num_free_blocks == 0
    bm.free(again)
    assert bm.num_free_blocks == 3
    assert bm.prefix_cache_hits == 8 and bm.prefix_cache_queries == 18


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    _run_prefill(bm, make_sequence(list(range(9))))
    assert bm.lookup_prefix(make_sequence(list(range(9)))) == []


def test_pool_size_follows_the_memory_budget():
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
    assert spec.bytes_per_block == 2 * 2 * 4 * 2 * 8 * 4
    assert spec.num_blocks_for(10 * spec.bytes_per_block + 5) == 10
    with pytest.raises(KVCacheConfigError, match="kv-cache-memory"):
        spec.num_blocks_for(spec.bytes_per_block - 1)
    cache = KVCache(spec, 10, "cpu")
    assert cache.k[0].shape == (11, 4, 2, 8)  # one scratch block for padded slots
    kv_store(
        torch.ones(2, 2, 8),
        torch.full((2, 2, 8), 2.0),
        cache.k[1],
        cache.v[1],
        torch.tensor([5, 9]),
    )
    assert cache.k[1][1, 1].eq(1).all() and cache.v[1][2, 1].eq(2).all()
    assert cache.k[0].eq(0).all()
