"""bench.peer_ckpt: a shape's checkpoint in the hub layout with the shipped tokenizer's ids,
which the project's loader reads as transformers does."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from bench.common import SHAPES
from bench.peer_ckpt import TOKENIZER_FROM, build, dtypes_arg, prepare, shapes_arg


def test_checkpoint_has_the_shape_the_ids_and_the_hub_layout(tmp_path):
    out = build(tmp_path / "ckpt", "tiny", "float32")
    config = json.loads((out / "config.json").read_text())
    text = SHAPES["tiny"]["text"]
    assert config["text_config"]["hidden_size"] == text["hidden_size"]
    assert config["text_config"]["num_experts"] == text["num_experts"]
    assert config["text_config"]["norm_topk_prob"] is True  # vLLM reads it
    added = json.loads((TOKENIZER_FROM / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in added}
    assert config["image_token_id"] == ids["<|image_pad|>"]
    assert config["text_config"]["vocab_size"] > max(ids.values())
    tensors = load_file(str(out / "model.safetensors"))
    e, h, i = text["num_experts"], text["hidden_size"], text["moe_intermediate_size"]
    gate_up = next(v for k, v in tensors.items() if k.endswith("experts.gate_up_proj"))
    assert tuple(gate_up.shape) == (e, h, 2 * i)
    assert (out / "tokenizer.json").read_bytes() == (TOKENIZER_FROM / "tokenizer.json").read_bytes()


def test_project_loader_reads_it_as_transformers_does(tmp_path):
    from transformers import Qwen3VLMoeForConditionalGeneration

    from shared.model.loader import load_text_model

    out = build(tmp_path / "ckpt", "tiny", "float32")
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_text_model(out).eval()
    ids = torch.tensor([5, 17, 42, 99, 3])
    positions = torch.arange(len(ids)).expand(3, -1)
    with torch.no_grad():
        want = hf(input_ids=ids[None]).logits[0]
        got = ours(
            positions=positions,
            inputs_embeds=ours.embed_tokens(ids),
            logits_indices=torch.arange(len(ids)),
        )
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_prepare_builds_a_shape_and_its_workload_once(tmp_path):
    """The recipe's make_work.py is the peer recipe's (beside the repository, not in it): a
    stand-in that records its arguments plays it here."""
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "make_work.py").write_text(
        "import json, pathlib, sys\n"
        "out = pathlib.Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'work.json').write_text(json.dumps({'ckpt': sys.argv[1]}))\n"
    )
    ckpt, work = prepare("tiny", recipe, tmp_path / "cache")
    assert json.loads((ckpt / "config.json").read_text())["text_config"]["hidden_size"] == 64
    assert json.loads((work / "work.json").read_text()) == {"ckpt": str(ckpt)}
    stamp = (ckpt / "model.safetensors").stat().st_mtime_ns
    assert prepare("tiny", recipe, tmp_path / "cache") == (ckpt, work)
    assert (ckpt / "model.safetensors").stat().st_mtime_ns == stamp  # built once


def test_shape_and_dtype_lists():
    assert shapes_arg("medium, wide,odd") == ("medium", "wide", "odd")
    assert dtypes_arg("float32,bfloat16") == ("float32", "bfloat16")
    for bad in ("", "medium,huge"):
        with pytest.raises(argparse.ArgumentTypeError, match="shapes are"):
            shapes_arg(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="float32 and bfloat16"):
        dtypes_arg("float16")
