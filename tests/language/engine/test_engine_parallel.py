"""The engine over two tensor-parallel (or expert-parallel) ranks in real processes over gloo
gives the single-process engine's tokens and logprobs, with images, prefix caching and chunked
prefill active."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.language.engine import EngineConfig
from tests.language.conftest import greedy_request, make_prompt_case, run_engine

# (text runs around the images, image (w, h) sizes, max_tokens); the last repeats the third.
CASES = [
    ([5], [], 6),
    ([4, 6], [(64, 96)], 6),
    ([3, 5, 2], [(64, 96), (96, 64)], 5),
    ([10, 3], [(128, 128)], 6),
    ([10, 3], [(128, 128)], 6),
]
# 7 tokens a step and 4-token blocks: every image is split across prefill chunks.
BASE = EngineConfig(
    kv_cache_memory=1 << 22, max_num_batched_tokens=7, block_size=4, max_model_len=512
)


@pytest.fixture(scope="module")
def requests(tiny_vision):
    seeds = [0, 1, 2, 3, 3]
    cases = [
        make_prompt_case(tiny_vision, runs, sizes, seed)
        for (runs, sizes, _), seed in zip(CASES, seeds, strict=True)
    ]
    return [
        greedy_request(f"r{i}", case, n, logprobs=5)
        for i, (case, (_, _, n)) in enumerate(zip(cases, CASES, strict=True))
    ]


@pytest.fixture(scope="module")
def single(tiny_vl_model_dir, requests):
    return run_engine(tiny_vl_model_dir, BASE, requests)


def _logprobs(outputs) -> list:
    return [lp for out in outputs for lp in (out.logprobs or ())]


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "ep2"])
def test_two_ranks_give_the_single_process_tokens_and_logprobs(
    tiny_vl_model_dir, requests, single, expert_parallel
):
    threads = torch.get_num_threads()
    config = dataclasses.replace(BASE, tensor_parallel_size=2, expert_parallel=expert_parallel)
    try:
        tokens, outputs, stats = run_engine(tiny_vl_model_dir, config, requests)
    finally:
        torch.set_num_threads(threads)
    want_tokens, want_outputs, _ = single
    assert tokens == want_tokens
    assert tokens["r3"] == tokens["r4"] and stats.prefix_cache_hits > 0
    for request_id, want in want_outputs.items():
        got, ref = _logprobs(outputs[request_id]), _logprobs(want)
        assert len(got) == len(ref) > 0
        for a, b in zip(got, ref, strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-5
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top, strict=True)) < 1e-5
    assert stats.num_free_blocks == stats.num_total_blocks
