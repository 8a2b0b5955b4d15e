"""Prefix caching with images: identical text and image reuse blocks, other images do not."""

from __future__ import annotations

import asyncio

from services.language.engine import AsyncEngine, EngineConfig
from tests.language.conftest import (
    PromptCase,
    assert_greedy_parity,
    collect,
    greedy_request,
    hf_greedy,
    make_prompt_case,
)

BLOCK = 4
MAX_TOKENS = 8


def _cases(vision):
    cat = make_prompt_case(vision, [10, 3], [(128, 128)], seed=3)
    other = make_prompt_case(vision, [10, 3], [(128, 128)], seed=11)
    # Same token ids as `cat` (text and pads), a different image behind the pads.
    dog = PromptCase(cat.ids, other.pixel_values, other.grid_thw, other.images)
    assert cat.images[0].content_hash != dog.images[0].content_hash
    return cat, dog


def test_same_text_different_images_and_identical_repeats(
    tiny_vision, tiny_vl_hf, tiny_vl_model_dir
):
    cat, dog = _cases(tiny_vision)
    config = EngineConfig(kv_cache_memory=1 << 22, block_size=BLOCK)

    async def main():
        engine = AsyncEngine.from_model_dir(tiny_vl_model_dir, config)
        await engine.start()
        try:
            runs = []
            for rid, case in [("cat", cat), ("dog", dog), ("cat-again", cat)]:
                outs = await collect(engine, [greedy_request(rid, case, MAX_TOKENS)])
                runs.append((outs[rid], engine.stats()))
            return runs
        finally:
            await engine.shutdown()

    (cat_out, s1), (dog_out, s2), (again_out, s3) = asyncio.run(main())
    tokens = [[t for o in outs for t in o.new_token_ids] for outs in (cat_out, dog_out, again_out)]
    num_prompt = cat.ids.shape[0]
    first_pad = int((cat.ids == 300).nonzero()[0])

    # Each image gets its own, correct continuation.
    assert_greedy_parity(tiny_vl_hf, cat, tokens[0], hf_greedy(tiny_vl_hf, cat, MAX_TOKENS))
    assert_greedy_parity(tiny_vl_hf, dog, tokens[1], hf_greedy(tiny_vl_hf, dog, MAX_TOKENS))
    assert tokens[0] != tokens[1]

    # The dog request reused only the text blocks in front of the image.
    assert cat_out[-1].num_cached_tokens == 0
    assert dog_out[-1].num_cached_tokens == first_pad // BLOCK * BLOCK
    assert s2.prefix_cache_hits - s1.prefix_cache_hits == first_pad // BLOCK * BLOCK

    # The identical request hit every full block but the one holding its last token.
    expected_hit = (num_prompt - 1) // BLOCK * BLOCK
    assert again_out[-1].num_cached_tokens == expected_hit
    assert s3.prefix_cache_hits - s2.prefix_cache_hits == expected_hit
    assert s3.prefix_cache_queries - s2.prefix_cache_queries == num_prompt
    assert tokens[2] == tokens[0]
    assert s3.num_free_blocks == s3.num_total_blocks
