"""Block FP8 checkpoints in transformers' fine-grained FP8 format, as Qwen publishes them.

A tiny Qwen3-VL-MoE whose every quantized dimension is a multiple of 128 is quantized by the
project's own writer (`scripts.quantize_fp8`), its layout checked key by key, and loaded.

The oracle is transformers 5.x with ``FineGrainedFP8Config(dequantize=True)`` on the CPU, fp32.
Its ``Qwen3VLMoeForConditionalGeneration`` cannot map the per-expert keys of an FP8 checkpoint
(``mlp.experts.{e}.gate_proj.weight``: it reports them unexpected and leaves the fused experts
random, huggingface/transformers#44230), so the language weights are checked against its
text-only ``Qwen3MoeForCausalLM`` on the very same tensors (the FP8 checkpoint's language keys
renamed ``model.language_model.`` -> ``model.``), whose expert mapping does read them. With
text-only positions M-RoPE is plain RoPE, so the two models are the same function.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from scripts.quantize_fp8 import quantize_checkpoint
from shared.kernels.reference import FP8_DTYPE, fp8_block_dequantize
from shared.model.fingerprint import vision_fingerprint
from shared.model.loader import load_text_model, load_vision_model, load_vl_model
from shared.model.processing import mrope_positions
from shared.model.qwen3_vl_moe import separate_deepstack_embeds, splice_image_embeds
from tests.model.helpers import images_inputs, prompt_ids
from tests.tiny import IMAGE_TOKEN_ID, TEXT, make_vl_checkpoint

# Every quantized dimension a multiple of 128; layer 1 dense (its MLP is quantized too).
FP8_TEXT = dict(
    hidden_size=128,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=128,
    moe_intermediate_size=256,
    intermediate_size=256,
    num_experts=4,
    mlp_only_layers=[1],
)
VISION = dict(out_hidden_size=128)
IDS = torch.arange(3, 40) % 290
QUANTIZED = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")


def _blocks(n: int) -> int:
    return -(-n // 128)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fp8-source")
    make_vl_checkpoint(path, seed=5, text=FP8_TEXT, vision=VISION, mrope=(24, 20, 20))
    return path


@pytest.fixture(scope="module", params=["float32", "bfloat16"], ids=["fp32-scales", "bf16-scales"])
def fp8_dir(request, source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"fp8-{request.param}")
    return quantize_checkpoint(source, out, scale_dtype=getattr(torch, request.param))


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_the_writer_lays_out_transformers_fine_grained_fp8(source, fp8_dir):
    src, out = _tensors(source), _tensors(fp8_dir)
    config = json.loads((fp8_dir / "config.json").read_text())
    quant = config["quantization_config"]
    assert {k: v for k, v in quant.items() if k != "modules_to_not_convert"} == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    scale_dtype = next(t.dtype for k, t in out.items() if k.endswith("weight_scale_inv"))
    expected: dict[str, tuple] = {}
    for key, tensor in src.items():
        experts = re.match(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", key)
        if experts:  # transformers 5 writes fused [E, 2I, H] / [E, H, I]: per expert [out, in]
            base, inter = experts.group(1), FP8_TEXT["moe_intermediate_size"]
            for e in range(tensor.shape[0]):
                if experts.group(2) == "gate_up_proj":
                    for name, rows in (
                        ("gate_proj", slice(0, inter)),
                        ("up_proj", slice(inter, None)),
                    ):
                        expected[f"{base}.{e}.{name}.weight"] = (tensor[e, rows], scale_dtype)
                else:
                    expected[f"{base}.{e}.down_proj.weight"] = (tensor[e], scale_dtype)
        elif QUANTIZED.search(key) and not key.startswith("model.visual."):
            expected[key] = (tensor, scale_dtype)
        else:
            expected[key] = (tensor, None)
    scales = {k for k in out if k.endswith("weight_scale_inv")}
    assert set(out) - scales == set(expected)
    for key, (want, scale) in expected.items():
        got = out[key]
        if scale is None:  # norms, routers, embeddings, lm_head, the vision tower: as stored
            assert got.dtype == want.dtype and torch.equal(got, want), key
            continue
        s = out[key.removesuffix("weight") + "weight_scale_inv"]
        assert got.dtype == FP8_DTYPE and got.shape == want.shape, key
        assert s.dtype == scale and s.shape == (_blocks(want.shape[0]), _blocks(want.shape[1]))
        error = (fp8_block_dequantize(got, s) - want).abs().max()
        assert error <= 2**-3 * want.abs().max(), key  # within half an e4m3 step of the max
    assert len(scales) == sum(s is not None for _, s in expected.values())
    modules = {k.removesuffix(".weight") for k in src if k.endswith(".weight")}
    kept = {
        m
        for m in modules
        if m.startswith("model.visual.")
        and src[m + ".weight"].dim() >= 2
        or m.endswith(".mlp.gate")
        or m in ("lm_head", "model.language_model.embed_tokens")
    }
    assert set(quant["modules_to_not_convert"]) == kept
    assert vision_fingerprint(fp8_dir) == vision_fingerprint(source)


def _text_only_copy(fp8_dir: Path, out: Path) -> Path:
    """The FP8 checkpoint's language tensors as a Qwen3-MoE text checkpoint (same bytes)."""
    out.mkdir(exist_ok=True)
    tensors = {
        k.replace("model.language_model.", "model."): t
        for k, t in _tensors(fp8_dir).items()
        if not k.startswith("model.visual.")
    }
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((fp8_dir / "config.json").read_text())
    text = {**TEXT, **FP8_TEXT, "rope_theta": 10000.0, "norm_topk_prob": True}
    config = {
        **text,
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "tie_word_embeddings": False,
        "quantization_config": raw["quantization_config"],
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def oracle(fp8_dir, tmp_path_factory):
    """transformers' text-only model on the FP8 language weights, dequantized to fp32."""
    from transformers import FineGrainedFP8Config, Qwen3MoeForCausalLM

    text_dir = _text_only_copy(fp8_dir, tmp_path_factory.mktemp("fp8-text"))
    return Qwen3MoeForCausalLM.from_pretrained(
        text_dir, dtype=torch.float32, quantization_config=FineGrainedFP8Config(dequantize=True)
    ).eval()


def _greedy(model, ids: torch.Tensor, steps: int) -> list[int]:
    tokens = ids.tolist()
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor(tokens))[-1].argmax()))
    return tokens[len(ids) :]


def test_fp8_checkpoint_matches_transformers_dequantized(fp8_dir, oracle):
    ours = load_text_model(fp8_dir)
    assert ours.model.layers[0].mlp.experts.gate_up_proj.dtype == FP8_DTYPE
    assert ours.model.layers[1].mlp.gate_proj.weight.dtype == FP8_DTYPE  # the dense layer
    assert ours.lm_head.weight.dtype == torch.float32
    with torch.no_grad():
        want = oracle(input_ids=IDS[None]).logits[0]
        got = ours(IDS)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3
    expected = oracle.generate(IDS[None], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert _greedy(ours.fuse_projections(), IDS, 8) == expected[0, len(IDS) :].tolist()


def test_split_path_equals_monolithic_on_fp8(fp8_dir):
    """Unquantized tower -> packed embeddings -> the FP8 language model, as the services run."""
    mono = load_vl_model(fp8_dir)
    vision, text = load_vision_model(fp8_dir), load_text_model(fp8_dir)
    pv, grid = images_inputs([(96, 64)], seed=3)
    ids = prompt_ids([5, 4], grid.tolist(), seed=1)
    with torch.no_grad():
        want = mono(ids, pv, grid)
        embeds, deepstack = separate_deepstack_embeds(vision(pv, grid), 2)
        embeds, deepstack = splice_image_embeds(
            ids, text.embed_tokens(ids), embeds, deepstack, IMAGE_TOKEN_ID
        )
        positions, _ = mrope_positions(ids, grid.tolist(), IMAGE_TOKEN_ID, 2)
        got = text(inputs_embeds=embeds, positions=positions, input_deepstack_embeds=deepstack)
    assert torch.equal(got, want)


def test_quantizing_at_load_equals_the_written_checkpoint(source, tmp_path):
    written = dict(load_text_model(quantize_checkpoint(source, tmp_path)).named_parameters())
    at_load = load_text_model(source, quantization="fp8")
    for name, param in at_load.named_parameters():
        assert param.dtype == written[name].dtype, name
        assert torch.equal(param.view(torch.uint8), written[name].view(torch.uint8)), name


def test_text_only_checkpoints_quantize_and_load(tmp_path):
    from transformers import FineGrainedFP8Config, Qwen3MoeForCausalLM

    from tests.tiny import make_text_checkpoint

    make_text_checkpoint(tmp_path / "src", seed=2, **FP8_TEXT)
    fp8_dir = quantize_checkpoint(tmp_path / "src", tmp_path / "fp8")
    oracle = Qwen3MoeForCausalLM.from_pretrained(
        fp8_dir, dtype=torch.float32, quantization_config=FineGrainedFP8Config(dequantize=True)
    ).eval()
    with torch.no_grad():
        want = oracle(input_ids=IDS[None]).logits[0]
        got = load_text_model(fp8_dir)(IDS)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-3


def test_fp8_checkpoints_stay_fp8_whatever_the_expert_dtype(fp8_dir):
    model = load_text_model(fp8_dir, torch.float32, expert_dtype=torch.bfloat16)
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == FP8_DTYPE
    assert experts.gate_up_proj_scale_inv.dtype == torch.float32


def test_a_float_weight_where_fp8_is_declared_is_refused(fp8_dir, tmp_path):
    import shutil

    from shared.model.checkpoint import CheckpointError

    broken = tmp_path / "broken"
    shutil.copytree(fp8_dir, broken)
    tensors = _tensors(broken)
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key].float()
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="q_proj.weight"):
        load_text_model(broken)


def test_reading_every_tensor_of_the_copy(fp8_dir):
    """safetensors reads the e4m3 tensors as torch.float8_e4m3fn (a published checkpoint's
    dtype tag F8_E4M3)."""
    with safe_open(fp8_dir / "model.safetensors", "pt") as f:
        key = "model.language_model.layers.0.mlp.experts.3.down_proj.weight"
        assert f.get_slice(key).get_dtype() == "F8_E4M3"
        assert f.get_tensor(key).dtype == FP8_DTYPE


def test_fp8_resident_weights_at_most_055_of_bf16_at_30b_a3b():
    """On the meta device at Qwen3-VL-30B-A3B's shape: what the language service holds for its
    FP8 checkpoint (e4m3 projections and experts, fp32 scales, bf16 embeddings, lm_head,
    routers and norms) against the bf16 checkpoint's."""
    from bench.common import model_config
    from shared.model.fp8 import resident_bytes, use_fp8
    from shared.model.qwen3_moe import Qwen3MoeForCausalLM

    config = model_config("30b-a3b").text
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    bf16 = resident_bytes(model, torch.bfloat16)
    assert use_fp8(model, lambda name: True) == config.num_hidden_layers * 5
    fp8 = resident_bytes(model, torch.bfloat16)
    assert 60e9 < bf16 < 62e9
    assert fp8 / bf16 <= 0.55, fp8 / bf16


def test_the_cached_copy_follows_its_source(source, tmp_path):
    """The demo's FP8 copy (`make demo FP8=1`) is written once and again after the source
    changes (the shipped model may be retrained under it)."""
    import os
    import shutil

    from scripts.quantize_fp8 import cached_copy

    model = shutil.copytree(source, tmp_path / "model")
    copy = cached_copy(model, tmp_path / "cache")
    first = (copy / "model.safetensors").stat().st_mtime_ns
    assert cached_copy(model, tmp_path / "cache") == copy
    assert (copy / "model.safetensors").stat().st_mtime_ns == first
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    cached_copy(model, tmp_path / "cache")
    assert (copy / "model.safetensors").stat().st_mtime_ns != first
    assert json.loads((copy / "config.json").read_text())["quantization_config"]
