"""The shipped checkpoint's files, and the hub-layout save path, read back by transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from scripts.shapes_vl.checkpoint import (
    CheckpointError,
    read_safetensors_header,
    to_hub_layout,
)
from scripts.shapes_vl.data import make_dataset
from scripts.shapes_vl.modelcfg import SmallModelConfig
from scripts.shapes_vl.prompts import make_batch
from scripts.shapes_vl.train import build_model, save_weights, write_static_files
from tests.shapes_vl.conftest import SHIPPED

MAX_CHECKPOINT_BYTES = 25 * 1024 * 1024

TINY = SmallModelConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    num_experts=4,
    moe_intermediate_size=48,
    vision_depth=2,
    vision_hidden_size=32,
    vision_num_heads=2,
    vision_intermediate_size=64,
    num_position_embeddings=64,
    deepstack_visual_indexes=(0,),
)


def _experts(header: dict) -> dict[str, list[int]]:
    return {k: v["shape"] for k, v in header.items() if ".mlp.experts." in k}


def test_shipped_weights_are_small_and_in_hub_layout(shipped_config):
    path = SHIPPED / "model.safetensors"
    assert path.stat().st_size <= MAX_CHECKPOINT_BYTES
    header = read_safetensors_header(path)
    text = shipped_config["text_config"]
    e, h, i = text["num_experts"], text["hidden_size"], text["moe_intermediate_size"]
    assert 2 * i != h
    experts = _experts(header)
    assert len(experts) == 2 * text["num_hidden_layers"]
    for name, shape in experts.items():
        if name.endswith("gate_up_proj"):
            assert shape == [e, h, 2 * i], name
        else:
            assert name.endswith("down_proj") and shape == [e, i, h], name
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}
    assert "lm_head.weight" in header and "model.visual.pos_embed.weight" in header


def test_shipped_config_fields(shipped_config):
    text, vision = shipped_config["text_config"], shipped_config["vision_config"]
    assert shipped_config["architectures"] == ["Qwen3VLMoeForConditionalGeneration"]
    assert text["norm_topk_prob"] is True
    assert text["head_dim"] >= 32 and text["num_attention_heads"] % text["num_key_value_heads"] == 0
    for rope in (text["rope_scaling"], text["rope_parameters"]):
        assert sum(rope["mrope_section"]) == text["head_dim"] // 2
        assert rope["mrope_interleaved"] is True and rope["rope_type"] == "default"
    assert text["rope_parameters"]["rope_theta"] == text["rope_theta"]
    assert vision["out_hidden_size"] == text["hidden_size"]
    assert math.isqrt(vision["num_position_embeddings"]) ** 2 == vision["num_position_embeddings"]
    assert (vision["hidden_size"] // vision["num_heads"]) % 4 == 0
    assert 2 <= len(vision["deepstack_visual_indexes"]) <= 3
    assert max(vision["deepstack_visual_indexes"]) < vision["depth"]
    assert shipped_config["tie_word_embeddings"] is False
    pre = json.loads((SHIPPED / "preprocessor_config.json").read_text())
    assert (pre["patch_size"], pre["merge_size"], pre["temporal_patch_size"]) == (16, 2, 2)
    assert pre["image_mean"] == pre["image_std"] == [0.5, 0.5, 0.5]
    assert pre["size"] == {"shortest_edge": pre["min_pixels"], "longest_edge": pre["max_pixels"]}
    assert pre["max_pixels"] // (32 * 32) <= 16


def test_transformers_reads_config_values(shipped_config):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(SHIPPED)
    text = shipped_config["text_config"]
    assert cfg.text_config.rope_parameters["mrope_section"] == text["rope_scaling"]["mrope_section"]
    assert cfg.text_config.rope_parameters["rope_theta"] == text["rope_theta"]
    assert cfg.text_config.rope_parameters["mrope_interleaved"] is True
    assert cfg.text_config.num_experts == text["num_experts"]
    assert (
        cfg.vision_config.deepstack_visual_indexes
        == shipped_config["vision_config"]["deepstack_visual_indexes"]
    )
    assert cfg.image_token_id == shipped_config["image_token_id"]


def test_transformers_loads_hub_layout_experts(shipped_hf_model):
    on_disk = load_file(str(SHIPPED / "model.safetensors"))
    params = dict(shipped_hf_model.named_parameters())
    for name, tensor in on_disk.items():
        if ".mlp.experts." in name:
            # In memory transformers keeps [E, 2I, H] / [E, H, I]: the transpose of the file's.
            assert torch.equal(params[name], tensor.transpose(1, 2)), name
        else:
            assert torch.equal(params[name], tensor), name


def test_to_hub_layout_transposes_only_experts():
    tensors = {
        "model.language_model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 96, 64),
        "model.language_model.layers.0.mlp.experts.down_proj": torch.randn(4, 64, 48),
        "model.language_model.layers.0.mlp.gate.weight": torch.randn(4, 64),
    }
    out = to_hub_layout(tensors, hidden_size=64, moe_intermediate_size=48)
    assert out["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 64, 96)
    assert out["model.language_model.layers.0.mlp.experts.down_proj"].shape == (4, 48, 64)
    gate = "model.language_model.layers.0.mlp.gate.weight"
    assert torch.equal(out[gate], tensors[gate])


def test_to_hub_layout_rejects_ambiguous_or_wrong_shapes():
    with pytest.raises(CheckpointError, match="ambiguous"):
        to_hub_layout({}, hidden_size=64, moe_intermediate_size=32)
    wrong = {"x.mlp.experts.gate_up_proj": torch.randn(4, 64, 96)}
    with pytest.raises(CheckpointError, match="expected"):
        to_hub_layout(wrong, hidden_size=64, moe_intermediate_size=48)


def test_saved_checkpoint_reloads_with_identical_logits(tmp_path):
    from transformers import AutoImageProcessor, Qwen3VLMoeForConditionalGeneration

    tokenizer, config = write_static_files(tmp_path, TINY, seed=0, corpus_size=300)
    torch.manual_seed(0)
    model = build_model(config).eval()
    save_weights(model, tmp_path, TINY)
    experts = _experts(read_safetensors_header(tmp_path / "model.safetensors"))
    assert all(s[1:] in ([64, 96], [48, 64]) for s in experts.values())

    reloaded = Qwen3VLMoeForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    examples = make_dataset(5, 3)
    batch = make_batch(
        tokenizer,
        AutoImageProcessor.from_pretrained(tmp_path),
        [e.image for e in examples],
        [e.question for e in examples],
    )
    with torch.no_grad():
        want = model(**batch.model_inputs()).logits
        got = reloaded.eval()(**batch.model_inputs()).logits
    assert torch.equal(got, want)
