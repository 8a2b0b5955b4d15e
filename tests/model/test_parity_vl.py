"""Parity of the project's Qwen3-VL-MoE with transformers on tiny random checkpoints (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from shared.model.loader import load_vl_model
from tests.model.helpers import hf_logits, images_inputs, prompt_ids
from tests.tiny import make_vl_checkpoint

TOL = 1e-4


@pytest.fixture(scope="module")
def ours(tiny_vl_dir):
    return load_vl_model(tiny_vl_dir)


def _compare(ours, hf, ids, pv=None, grid=None):
    with torch.no_grad():
        got = ours(ids, pv, grid)
    want = hf_logits(hf, ids, pv, grid)
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"max |logit diff| {diff:.3g}"
    return diff


def test_text_only(ours, tiny_vl):
    ids = prompt_ids([23], [])
    _compare(ours, tiny_vl[1], ids)


def test_one_image(ours, tiny_vl):
    pv, grid = images_inputs([(96, 64)])
    ids = prompt_ids([5, 7], grid.tolist())
    _compare(ours, tiny_vl[1], ids, pv, grid)


def test_two_images_non_square_text_between(ours, tiny_vl):
    pv, grid = images_inputs([(64, 160), (128, 96)], seed=3)
    assert grid[0, 1] != grid[0, 2] and grid[1, 1] != grid[1, 2]
    ids = prompt_ids([4, 9, 6], grid.tolist(), seed=1)
    _compare(ours, tiny_vl[1], ids, pv, grid)


def test_sparse_step_and_mlp_only_layers(tmp_path):
    hf = make_vl_checkpoint(
        tmp_path, seed=5, text=dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
    )
    model = load_vl_model(tmp_path)
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["DenseMLP", "SparseMoeBlock", "DenseMLP", "DenseMLP"]
    pv, grid = images_inputs([(96, 64)])
    _compare(model, hf, prompt_ids([3, 8], grid.tolist()), pv, grid)


def test_config_in_457_dialect(tmp_path, tiny_vl):
    """rope_scaling + rope_theta inside text_config, as transformers 4.57 writes them."""
    src = tiny_vl[0]
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg["text_config"].pop("rope_parameters")
    cfg["text_config"]["rope_theta"] = rope.pop("rope_theta")
    cfg["text_config"]["rope_scaling"] = {**rope, "type": "default"}
    cfg["text_config"]["num_experts"] = cfg["text_config"].pop("num_local_experts")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = load_vl_model(tmp_path)
    pv, grid = images_inputs([(64, 96)])
    _compare(model, tiny_vl[1], prompt_ids([6, 4], grid.tolist()), pv, grid)
