"""The persistent-buffer runner: padded decode steps give the unpadded tokens (and
transformers' through the parity helper), and a decode forward never reads a device value on
the host, so it can be captured in a CUDA graph."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.language.engine import EngineConfig
from services.language.engine.build import build_engine_core
from shared.kernels.reference import fused_moe_torch, paged_decode_torch
from tests.language.conftest import (
    assert_greedy_parity,
    greedy_request,
    hf_greedy,
    make_prompt_case,
    run_engine,
)

CASES = [
    ([5], [], 9),
    ([4, 6], [(64, 96)], 8),
    ([3, 5, 2], [(64, 96), (96, 64)], 7),
    ([10, 3], [(128, 128)], 9),
    ([10, 3], [(128, 128)], 9),
    ([30], [], 6),
]
CONFIGS = {
    "prefix-cache": EngineConfig(kv_cache_memory=1 << 22, max_model_len=512),
    "chunked": EngineConfig(
        kv_cache_memory=1 << 22, max_num_batched_tokens=7, block_size=4, max_model_len=512
    ),
    # 11 blocks of 4 tokens: the prompts do not all fit, so requests are preempted.
    "preemption": EngineConfig(
        kv_cache_memory=11 * 2 * 3 * 4 * 2 * 32 * 4, block_size=4, max_model_len=128
    ),
}


@pytest.fixture(scope="module")
def cases(tiny_vision):
    seeds = [0, 1, 2, 3, 3, 5]
    return [
        make_prompt_case(tiny_vision, runs, sizes, seed)
        for (runs, sizes, _), seed in zip(CASES, seeds, strict=True)
    ]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_padded_decode_steps_give_the_unpadded_tokens(name, cases, tiny_vl_model_dir, tiny_vl_hf):
    requests = [
        greedy_request(f"r{i}", case, n)
        for i, (case, (_, _, n)) in enumerate(zip(cases, CASES, strict=True))
    ]
    config = CONFIGS[name]
    plain, _, _ = run_engine(
        tiny_vl_model_dir, dataclasses.replace(config, pad_decodes=False), requests
    )
    padded, _, stats = run_engine(
        tiny_vl_model_dir, dataclasses.replace(config, pad_decodes=True), requests
    )
    assert padded == plain
    for i, case in enumerate(cases):
        assert_greedy_parity(
            tiny_vl_hf, case, padded[f"r{i}"], hf_greedy(tiny_vl_hf, case, CASES[i][2])
        )
    if name == "preemption":
        assert stats.num_preemptions > 0
    assert stats.num_free_blocks == stats.num_total_blocks


def _forbid_host_reads(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("a decode forward read a tensor value on the host")

    for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)


def test_a_decode_forward_reads_nothing_back(cases, tiny_vl_model_dir, monkeypatch):
    config = EngineConfig(kv_cache_memory=1 << 22, max_model_len=512, pad_decodes=True)
    core = build_engine_core(tiny_vl_model_dir, config)
    for i, case in enumerate(cases[:4]):
        core.add_request(greedy_request(f"r{i}", case, 8))
    while (
        any(s.num_output_tokens == 0 for s in core.scheduler.running) or core.scheduler.num_waiting
    ):
        core.step()
    runner = core.executor.runner
    scheduled = core.scheduler.schedule()
    assert all(w.num_tokens == 1 for w in scheduled.chunks)
    runner.state.update(scheduled.plan)
    batch = runner.prepare(scheduled.plan)  # host-side preparation may read host lists
    assert batch.num_decodes == 4 and batch.graph_size is None
    tables = runner.metadata(batch).decode_block_tables  # a graph's: fixed width and address
    assert (
        tables.dtype == torch.int32 and tables.shape == runner.buffers.decode_block_tables[:4].shape
    )
    assert tables.data_ptr() == runner.buffers.decode_block_tables.data_ptr()
    with monkeypatch.context() as patch:
        _forbid_host_reads(patch)
        logits = runner.forward(batch)
    assert logits.shape[0] == 4


def test_padding_rows_of_a_padded_step_route_to_no_expert(cases, tiny_vl_model_dir):
    """3 decodes padded to 4: the padding row is counted out on the device, so the router gives
    it no expert and every MoE layer's output for it is zero; the real rows are routed."""
    config = EngineConfig(kv_cache_memory=1 << 22, max_model_len=512, pad_decodes=True)
    core = build_engine_core(tiny_vl_model_dir, config)
    for i, case in enumerate(cases[:3]):
        core.add_request(greedy_request(f"r{i}", case, 8))
    while (
        any(s.num_output_tokens == 0 for s in core.scheduler.running) or core.scheduler.num_waiting
    ):
        core.step()
    model = core.executor.runner.model
    seen = []
    hooks = []
    for layer in model.model.layers:
        mlp = layer.mlp
        if hasattr(mlp, "gate"):
            hooks.append(mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out)))
            hooks.append(mlp.register_forward_hook(lambda m, a, out: seen.append(out)))
    try:
        core.step()
    finally:
        for hook in hooks:
            hook.remove()
    assert seen, "the tiny model has MoE layers"
    num_experts = model.config.num_experts
    for (weights, ids), moe_out in zip(seen[::2], seen[1::2], strict=True):
        assert ids.shape[0] == 4
        assert (ids[:3] < num_experts).all() and (ids[3] == num_experts).all()
        assert (weights[3] == 0).all()
        assert torch.equal(moe_out[3], torch.zeros_like(moe_out[3]))


def test_the_reference_kernels_read_nothing_back(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x, gate_up, down = (
        torch.randn(5, 64, generator=gen),
        torch.randn(4, 64, 96, generator=gen),
        torch.randn(4, 48, 64, generator=gen),
    )
    ids = torch.randint(0, 4, (5, 2), generator=gen)
    weights = torch.rand(5, 2, generator=gen)
    q, cache = torch.randn(3, 4, 32, generator=gen), torch.randn(9, 4, 2, 32, generator=gen)
    tables, lens = torch.randint(0, 9, (3, 5), generator=gen), torch.tensor([3, 20, 1])
    with monkeypatch.context() as patch:
        _forbid_host_reads(patch)
        fused_moe_torch(x, gate_up, down, weights, ids)
        paged_decode_torch(q, cache, cache, tables, lens, 0.2)
