"""A KV pool too small for every request at once: preemption by recompute, same outputs."""

from __future__ import annotations

import pytest
import torch

from services.language.engine import EngineConfig
from services.language.runner.kv_pool import KVCacheSpec
from shared.model.config import load_config
from tests.language.conftest import greedy_request, make_prompt_case, run_engine

BLOCK = 4
CASES = [
    ([30], [], 14),
    ([4, 6], [(64, 96)], 12),
    ([10, 3], [(128, 128)], 12),
    ([3, 5, 2], [(64, 96), (96, 64)], 10),
    ([17], [], 16),
    ([6, 2, 9], [(128, 64), (64, 64)], 9),
]


@pytest.fixture(scope="module")
def requests(tiny_vision):
    return [
        greedy_request(f"r{i}", make_prompt_case(tiny_vision, runs, sizes, seed=20 + i), n)
        for i, (runs, sizes, n) in enumerate(CASES)
    ]


def _block_bytes(model_dir) -> int:
    text = load_config(model_dir).text
    spec = KVCacheSpec(
        text.num_hidden_layers, text.num_key_value_heads, text.head_dim, BLOCK, dtype=torch.float32
    )
    return spec.bytes_per_block


@pytest.mark.parametrize("prefix", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_small_pool_completes_every_request_like_an_unconstrained_run(
    requests, tiny_vl_model_dir, prefix
):
    free_run, _, free_stats = run_engine(
        tiny_vl_model_dir,
        EngineConfig(kv_cache_memory=1 << 22, block_size=BLOCK, enable_prefix_caching=prefix),
        requests,
    )
    assert free_stats.num_preemptions == 0
    # 13 blocks hold the longest request (46 tokens) but nowhere near all six at once.
    small = EngineConfig(
        kv_cache_memory=13 * _block_bytes(tiny_vl_model_dir),
        block_size=BLOCK,
        max_num_batched_tokens=16,
        enable_prefix_caching=prefix,
    )
    tight_run, outputs, stats = run_engine(tiny_vl_model_dir, small, requests)
    assert stats.num_total_blocks == 13
    assert stats.num_preemptions > 0
    assert tight_run == free_run
    assert all(outs[-1].finish_reason == "length" for outs in outputs.values())
    assert stats.num_free_blocks == stats.num_total_blocks
