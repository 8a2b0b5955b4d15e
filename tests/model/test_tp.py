"""Tensor and expert parallelism: real processes over gloo give the single-process logits, and
each rank reads only its slices of the checkpoint."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.model.checkpoint import checkpoint_files
from shared.model.config import load_config
from shared.model.loader import load_text_model
from shared.model.parallel import (
    ParallelLayout,
    TensorParallelError,
    load_parallel_text_model,
    shard_specs,
)
from tests.tiny import make_vl_checkpoint

IDS = torch.arange(3, 40) % 290


def _worker(rank: int, world: int, ep: bool, store: str, model_dir: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        layout = ParallelLayout(rank, world, expert_parallel=ep)
        model, bytes_read = load_parallel_text_model(model_dir, layout, dist.group.WORLD)
        with torch.no_grad():
            logits = model(IDS)
        params = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
        torch.save(
            {"logits": logits, "bytes_read": dict(bytes_read), "params": params}, f"{out}.{rank}"
        )
        # Neither rank tears down its gloo pairs while the other may still be using them.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: gloo's background threads can abort the process ("terminate
    # called without an active exception") from static destructors after the work is done.
    os._exit(0)


def _run(tmp_path, model_dir, world: int, ep: bool) -> list[dict]:
    out = tmp_path / f"out-{world}-{ep}"
    mp.start_processes(
        _worker,
        args=(world, ep, str(tmp_path / f"store-{ep}"), str(model_dir), str(out)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return [torch.load(f"{out}.{r}") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 1], ids=["kv-sharded", "kv-replicated"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tp-{request.param}")
    make_vl_checkpoint(
        path,
        seed=4,
        text=dict(num_key_value_heads=request.param, decoder_sparse_step=2, intermediate_size=64),
    )
    return path


@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
def test_two_ranks_match_one_and_read_half_the_experts(tmp_path, checkpoint, ep):
    ranks = _run(tmp_path, checkpoint, 2, ep)
    with torch.no_grad():
        want = load_text_model(checkpoint)(IDS)
    for rank in ranks:
        assert (rank["logits"] - want).abs().max().item() < 1e-5
    sizes = _tensor_bytes(checkpoint)
    experts = [k for k in sizes if ".experts." in k]
    assert experts
    for rank in ranks:
        for key in experts:  # no rank materializes more than its half of any expert tensor
            assert rank["bytes_read"][key] == sizes[key] // 2, key
        loaded = sum(rank["params"].values())
        full = sum(sizes.values()) - _vision_bytes(sizes)
        assert loaded < 0.62 * full  # about half of the sharded tensors plus the replicated


def _tensor_bytes(model_dir) -> dict[str, int]:
    from safetensors import safe_open

    sizes = {}
    for key, path in checkpoint_files(model_dir).items():
        with safe_open(path, "pt") as f:
            t = f.get_tensor(key)
            sizes[key] = t.numel() * t.element_size()
    return sizes


def _vision_bytes(sizes: dict[str, int]) -> int:
    return sum(v for k, v in sizes.items() if ".visual." in k)


def test_indivisible_heads_are_refused(tiny_vl_dir):
    with pytest.raises(TensorParallelError, match="attention heads"):
        shard_specs(load_config(tiny_vl_dir).text, ParallelLayout(0, 3))
    six_experts = dataclasses.replace(load_config(tiny_vl_dir).text, num_experts=6)
    with pytest.raises(TensorParallelError, match="num_experts"):
        shard_specs(six_experts, ParallelLayout(0, 4, expert_parallel=True))
