"""Tensor parallelism: two real processes over gloo give the single-process logits."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shared.model.loader import load_text_model
from shared.model.tp import TensorParallelError, TPGroup, apply_tensor_parallel
from tests.tiny import make_vl_checkpoint


def _worker(rank: int, world: int, store_path: str, model_dir: str, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model = load_text_model(model_dir)
        apply_tensor_parallel(model, TPGroup(rank, world))
        ids = torch.arange(3, 40) % 290
        with torch.no_grad():
            logits = model(ids)
        if rank == 0:
            torch.save(logits, out_path)
        # Neither rank tears down its gloo pairs while the other may still be using them.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: gloo's background threads can abort the process ("terminate
    # called without an active exception") from static destructors after the work is done.
    os._exit(0)


@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["kv-sharded", "kv-replicated"])
def test_tp2_matches_single_process(tmp_path, num_kv_heads):
    model_dir = tmp_path / "ckpt"
    make_vl_checkpoint(
        model_dir,
        seed=4,
        text=dict(num_key_value_heads=num_kv_heads, decoder_sparse_step=2, intermediate_size=64),
    )
    out = tmp_path / "logits.pt"
    mp.start_processes(
        _worker,
        args=(2, str(tmp_path / "store"), str(model_dir), str(out)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    ref = load_text_model(model_dir)
    with torch.no_grad():
        want = ref(torch.arange(3, 40) % 290)
    got = torch.load(out)
    assert (got - want).abs().max().item() < 1e-5


def test_indivisible_heads_rejected(tiny_vl_dir):
    model = load_text_model(tiny_vl_dir)
    with pytest.raises(TensorParallelError, match="heads"):
        apply_tensor_parallel(model, TPGroup(0, 3))
