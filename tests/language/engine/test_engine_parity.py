"""Greedy parity with transformers generate for concurrent text, one-image and two-image prompts."""

from __future__ import annotations

import pytest

from services.language.engine import EngineConfig
from tests.language.conftest import (
    assert_greedy_parity,
    greedy_request,
    hf_greedy,
    make_prompt_case,
    run_engine,
)

# (text runs around the images, image (w, h) sizes, max_tokens)
CASES = [
    ([5], [], 10),
    ([23], [], 6),
    ([4, 6], [(64, 96)], 8),
    ([10, 3], [(128, 128)], 12),  # 16 image tokens
    ([3, 5, 2], [(64, 96), (96, 64)], 7),
    ([6, 2, 9], [(128, 64), (64, 64)], 9),
    ([40], [], 5),
    ([1, 20], [(96, 128)], 10),
    ([10, 3], [(128, 128)], 12),  # same text and image as case 3
]


@pytest.fixture(scope="module")
def cases(tiny_vision):
    seeds = [0, 1, 2, 3, 4, 5, 6, 7, 3]
    return [
        make_prompt_case(tiny_vision, runs, sizes, seed)
        for (runs, sizes, _), seed in zip(CASES, seeds, strict=True)
    ]


@pytest.fixture(scope="module")
def oracle(tiny_vl_hf, cases):
    return [hf_greedy(tiny_vl_hf, case, n) for case, (_, _, n) in zip(cases, CASES, strict=True)]


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(kv_cache_memory=1 << 22),
        EngineConfig(kv_cache_memory=1 << 22, enable_prefix_caching=False),
        # 7 tokens a step: every image (6 to 16 tokens) is split across prefill chunks.
        EngineConfig(kv_cache_memory=1 << 22, max_num_batched_tokens=7, block_size=4),
    ],
    ids=["prefix-cache", "no-prefix-cache", "tiny-token-budget"],
)
def test_concurrent_greedy_matches_transformers(
    config, cases, oracle, tiny_vl_hf, tiny_vl_model_dir
):
    requests = [
        greedy_request(f"r{i}", case, n)
        for i, (case, (_, _, n)) in enumerate(zip(cases, CASES, strict=True))
    ]
    tokens, _, stats = run_engine(tiny_vl_model_dir, config, requests)
    for i, case in enumerate(cases):
        assert len(tokens[f"r{i}"]) == CASES[i][2]
        assert_greedy_parity(tiny_vl_hf, case, tokens[f"r{i}"], oracle[i])
    assert tokens["r3"] == tokens["r8"]
    assert stats.num_free_blocks == stats.num_total_blocks  # the pool is whole again
    assert stats.num_running == stats.num_waiting == 0
