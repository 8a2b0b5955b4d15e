"""Checkpoint loading: layouts, sharding, partial loads and the errors that name the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shared.model.config import ModelConfigError, load_config
from shared.model.loader import CheckpointError, load_text_model, load_vision_model, load_vl_model
from tests.model.helpers import hf_logits, images_inputs, prompt_ids
from tests.tiny import make_vl_checkpoint


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _rewrite(src, dst, edit) -> None:
    """Copy a checkpoint directory, passing its tensors through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    save_file(edit(_tensors(src)), dst / "model.safetensors", metadata={"format": "pt"})


def _logits(path):
    model = load_vl_model(path)
    pv, grid = images_inputs([(96, 64)])
    with torch.no_grad():
        return model(prompt_ids([4, 5], grid.tolist()), pv, grid)


def _to_hub_layout(t: dict) -> dict:
    """transformers v5 writes [E, 2I, H] / [E, H, I]; the hub checkpoints hold [E, H, 2I] / [E, I,
    H]."""
    return {k: v.transpose(1, 2).contiguous() if ".experts." in k else v for k, v in t.items()}


def test_hub_expert_layout_equals_v5_layout(tiny_vl_dir, tmp_path):
    hub = tmp_path / "hub"
    _rewrite(tiny_vl_dir, hub, _to_hub_layout)
    with safe_open(hub / "model.safetensors", "pt") as f:
        shape = f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape()
    assert shape == [8, 64, 96]  # [E, H, 2I]
    assert torch.equal(_logits(hub), _logits(tiny_vl_dir))


def test_sharded_checkpoint(tmp_path):
    hf = make_vl_checkpoint(tmp_path / "one", seed=3)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shutil.copy(tmp_path / "one" / "preprocessor_config.json", tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert torch.equal(_logits(tmp_path / "sharded"), _logits(tmp_path / "one"))


def test_text_load_never_needs_vision_tensors(tiny_vl_dir, tmp_path):
    text_only = tmp_path / "no_vision"
    _rewrite(tiny_vl_dir, text_only, lambda t: {k: v for k, v in t.items() if ".visual." not in k})
    model = load_text_model(text_only)
    assert not any(p.is_meta for p in model.parameters())
    with pytest.raises(CheckpointError, match="lacks"):
        load_vision_model(text_only)


def test_vision_load_never_needs_text_tensors(tiny_vl_dir, tmp_path):
    vision_only = tmp_path / "no_text"
    _rewrite(tiny_vl_dir, vision_only, lambda t: {k: v for k, v in t.items() if ".visual." in k})
    model = load_vision_model(vision_only)
    assert not any(p.is_meta for p in model.parameters())


def test_missing_tensor_is_named(tiny_vl_dir, tmp_path):
    key = "model.language_model.layers.1.self_attn.q_norm.weight"
    _rewrite(tiny_vl_dir, tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_text_model(tmp_path / "m")


def test_unexpected_tensor_is_named(tiny_vl_dir, tmp_path):
    key = "model.language_model.layers.0.self_attn.extra.weight"
    _rewrite(tiny_vl_dir, tmp_path / "u", lambda t: {**t, key: torch.zeros(2)})
    with pytest.raises(CheckpointError, match="extra"):
        load_text_model(tmp_path / "u")


def test_misshaped_tensor_is_named(tiny_vl_dir, tmp_path):
    key = "model.language_model.layers.2.self_attn.k_proj.weight"
    _rewrite(tiny_vl_dir, tmp_path / "s", lambda t: {**t, key: torch.zeros(3, 64)})
    with pytest.raises(CheckpointError, match="k_proj"):
        load_text_model(tmp_path / "s")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_dtype(tiny_vl_dir, dtype):
    model = load_text_model(tiny_vl_dir, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_bf16_forward_near_fp32(tiny_vl_dir):
    pv, grid = images_inputs([(96, 64), (64, 64)])
    ids = prompt_ids([6, 5, 3], grid.tolist())
    fp32 = load_vl_model(tiny_vl_dir)
    bf16 = load_vl_model(tiny_vl_dir, dtype=torch.bfloat16)
    with torch.no_grad():
        a = fp32(ids, pv, grid)
        b = bf16(ids, pv, grid).float()
    assert torch.isfinite(b).all()
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 0.05, rel


def _write_config(tmp_path, tiny_vl_dir, edit):
    shutil.copytree(tiny_vl_dir, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    edit(cfg)
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "c"


def test_unsupported_model_type(tmp_path, tiny_vl_dir):
    path = _write_config(tmp_path, tiny_vl_dir, lambda c: c.update(model_type="llama"))
    with pytest.raises(ModelConfigError, match="unsupported model_type 'llama'"):
        load_config(path)


def test_inconsistent_mrope_section(tmp_path, tiny_vl_dir):
    def edit(c):
        c["text_config"]["rope_parameters"]["mrope_section"] = [6, 5, 4]

    with pytest.raises(ModelConfigError, match="mrope_section"):
        load_config(_write_config(tmp_path, tiny_vl_dir, edit))


def test_inconsistent_vision_width(tmp_path, tiny_vl_dir):
    def edit(c):
        c["vision_config"]["out_hidden_size"] = 48

    with pytest.raises(ModelConfigError, match="out_hidden_size"):
        load_config(_write_config(tmp_path, tiny_vl_dir, edit))


def test_tying_follows_top_level_flag(tiny_vl_dir):
    # text_config carries the v5 class default tie_word_embeddings=true; the top level says false.
    raw = json.loads((tiny_vl_dir / "config.json").read_text())
    assert raw["text_config"]["tie_word_embeddings"] is True
    model = load_text_model(tiny_vl_dir)
    assert load_config(tiny_vl_dir).tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_square_expert_layout_follows_writer_version(tmp_path):
    """With 2I == H the shape cannot tell hub from v5; config.json's transformers_version does."""
    v5 = tmp_path / "v5"
    hf = make_vl_checkpoint(v5, seed=9, text=dict(moe_intermediate_size=32))  # 2I = 64 = H
    pv, grid = images_inputs([(96, 64)])
    ids = prompt_ids([4, 5], grid.tolist())
    want = hf_logits(hf, ids, pv, grid)
    assert (_logits(v5) - want).abs().max() <= 1e-4

    hub = tmp_path / "hub"
    _rewrite(v5, hub, _to_hub_layout)
    cfg = json.loads((hub / "config.json").read_text())
    cfg["transformers_version"] = "4.57.1"
    (hub / "config.json").write_text(json.dumps(cfg))
    assert (_logits(hub) - want).abs().max() <= 1e-4
