"""The start-up warm-up step: as many dummy tokens as a step may carry, in requests the pool
holds, forgotten afterwards; an engine that ran it answers exactly as one that did not."""

from __future__ import annotations

import dataclasses

import pytest

from services.language.engine import EngineConfig
from services.language.engine.build import build_engine_core
from services.language.runner.model_runner import RunnerConfig
from services.language.runner.warmup import warm_up_plans
from shared.kernels import select
from tests.language.conftest import greedy_request, make_prompt_case, run_engine


@pytest.mark.parametrize(
    "config, num_blocks, tokens, lengths",
    [
        (RunnerConfig(8, 2048, 1024, 16), 1000, 2048, [1024, 1024]),
        (RunnerConfig(8, 2048, 4096, 16), 1000, 2048, [2048]),
        (RunnerConfig(8, 100, 30, 4), 1000, 100, [30, 30, 30, 10]),
        (RunnerConfig(2, 100, 30, 4), 1000, 60, [30, 30]),  # max_num_seqs requests at most
        (RunnerConfig(8, 2048, 1024, 16), 10, 160, [160]),  # what the pool holds
    ],
)
def test_the_step_fills_a_step_within_the_limits(config, num_blocks, tokens, lengths):
    step, forget = warm_up_plans(config, num_blocks)
    assert [c.num_tokens for c in step.chunks] == lengths
    assert step.num_tokens == tokens
    blocks = [b for r in step.new_requests for b in r.block_ids]
    assert len(blocks) == len(set(blocks)) and max(blocks) < num_blocks
    for r in step.new_requests:
        assert len(r.block_ids) * config.block_size >= len(r.token_ids) == r.num_prompt_tokens
        assert r.num_computed_tokens == 0 and not r.images
    assert set(forget.forgotten_ids) == {r.request_id for r in step.new_requests}
    assert not forget.chunks and not forget.new_requests


@pytest.mark.skipif(
    select.backend("cpu") != "cpu", reason="the warm-up step runs with the C++ CPU kernels only"
)
def test_the_runner_forgets_the_warm_up_requests(tiny_vl_model_dir, caplog):
    with caplog.at_level("INFO", logger="services.language.runner.warmup"):
        core = build_engine_core(
            tiny_vl_model_dir, EngineConfig(kv_cache_memory=1 << 22, max_model_len=64)
        )
    assert len(core.executor.runner.state) == 0
    [line] = [r.getMessage() for r in caplog.records if "warm-up step" in r.getMessage()]
    assert line.startswith("warm-up step: 2048 tokens in 32 requests")
    stats = core.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_a_warmed_up_engine_gives_the_same_tokens(tiny_vision, tiny_vl_model_dir):
    """Prefix caching on, repeated prompts, a pool small enough that requests reuse the blocks
    the warm-up step wrote into."""
    cases = [
        make_prompt_case(tiny_vision, runs, sizes, seed)
        for runs, sizes, seed in (
            ([5], [], 0),
            ([4, 6], [(64, 96)], 1),
            ([4, 6], [(64, 96)], 1),
            ([30], [], 2),
        )
    ]
    requests = [greedy_request(f"r{i}", case, 8) for i, case in enumerate(cases)]
    config = EngineConfig(kv_cache_memory=1 << 20, max_model_len=256, block_size=4)
    cold, _, _ = run_engine(tiny_vl_model_dir, dataclasses.replace(config, warm_up=False), requests)
    warm, _, stats = run_engine(tiny_vl_model_dir, config, requests)
    assert warm == cold
    assert stats.num_free_blocks == stats.num_total_blocks
