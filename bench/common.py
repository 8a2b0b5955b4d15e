"""What the benchmarks share: model shapes, random-weight models of them built in memory, a
tokenizer for random prompts, and the device sync before reading a clock.

`30b-a3b` is Qwen3-VL-30B-A3B's shape; on one GPU its random bf16 weights (61 GB) are made in
place on the device, no checkpoint on disk. `medium` is the CPU peer benchmark's shape.
"""

from __future__ import annotations

import json

import torch

from scripts.testkit.checkpoints import Init, randomize
from scripts.testkit.tokenizers import build_tokenizer
from services.language.engine.tokenizer import LanguageTokenizer
from shared.model.config import ModelConfig, parse_config
from shared.model.qwen3_moe import Qwen3MoeForCausalLM
from shared.model.vision import Qwen3VLVisionModel

# moe_intermediate_size is chosen so that 2 * I != hidden: the loader tells the hub expert layout
# from transformers' transposed one by shape, which is ambiguous when they are equal.
SHAPES = {
    "tiny": dict(
        text=dict(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            moe_intermediate_size=48,
            intermediate_size=96,
            num_experts=8,
            num_experts_per_tok=2,
            vocab_size=2048,
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        mrope=(6, 5, 5),
    ),
    "medium": dict(
        text=dict(
            hidden_size=512,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            moe_intermediate_size=384,
            intermediate_size=1024,
            num_experts=16,
            num_experts_per_tok=4,
            vocab_size=16384,
        ),
        vision=dict(
            depth=4,
            hidden_size=128,
            num_heads=4,
            intermediate_size=256,
            num_position_embeddings=576,
            deepstack_visual_indexes=[1, 3],
        ),
        mrope=(12, 10, 10),
    ),
    # Shapes the CPU kernels were not written against: wider with more experts and fewer kv
    # heads, and one where nothing is a power of two.
    "wide": dict(
        text=dict(
            hidden_size=1024,
            num_hidden_layers=6,
            num_attention_heads=16,
            num_key_value_heads=2,
            head_dim=64,
            moe_intermediate_size=256,
            intermediate_size=2048,
            num_experts=32,
            num_experts_per_tok=8,
            vocab_size=16384,
        ),
        vision=dict(
            depth=4,
            hidden_size=128,
            num_heads=4,
            intermediate_size=256,
            num_position_embeddings=576,
            deepstack_visual_indexes=[1, 3],
        ),
        mrope=(12, 10, 10),
    ),
    "odd": dict(
        text=dict(
            hidden_size=576,
            num_hidden_layers=7,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            moe_intermediate_size=200,
            intermediate_size=1000,
            num_experts=24,
            num_experts_per_tok=6,
            vocab_size=16384,
        ),
        vision=dict(
            depth=3,
            hidden_size=144,
            num_heads=3,
            intermediate_size=400,
            num_position_embeddings=576,
            deepstack_visual_indexes=[0, 2],
        ),
        mrope=(12, 10, 10),
    ),
    "30b-a3b": dict(
        text=dict(
            hidden_size=2048,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            moe_intermediate_size=768,
            intermediate_size=6144,
            num_experts=128,
            num_experts_per_tok=8,
            vocab_size=151936,
        ),
        vision=dict(
            depth=27,
            hidden_size=1152,
            num_heads=16,
            intermediate_size=4304,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24],
        ),
        mrope=(24, 20, 20),
    ),
}
SPECIAL = {"image": 151655, "video": 151656, "start": 151652, "end": 151653}


def special_ids(vocab: int) -> dict[str, int]:
    """Real ids where the vocabulary has room; otherwise the last four ids of a small one."""
    if vocab > max(SPECIAL.values()):
        return dict(SPECIAL)
    return {name: vocab - 4 + i for i, name in enumerate(SPECIAL)}


def shape_configs(shape: str, layers: int | None = None) -> tuple[dict, dict, dict[str, int]]:
    """(text config, vision config, special ids) of a benchmark shape, as config.json spells
    them (`layers` overrides the decoder depth)."""
    spec = SHAPES[shape]
    text = {**spec["text"], "max_position_embeddings": 32768, "rms_norm_eps": 1e-6}
    if layers:
        text["num_hidden_layers"] = layers
    vision = {
        **spec["vision"],
        "out_hidden_size": text["hidden_size"],
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    # Deepstack feeds the first k decoder layers: a shallower model keeps as many as fit
    vision["deepstack_visual_indexes"] = vision["deepstack_visual_indexes"][
        : text["num_hidden_layers"]
    ]
    return text, vision, special_ids(text["vocab_size"])


def model_config(shape: str, layers: int | None = None) -> ModelConfig:
    """The ModelConfig of a benchmark shape (`layers` overrides the decoder depth)."""
    text, vision, special = shape_configs(shape, layers)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 5e6,
        "mrope_section": list(SHAPES[shape]["mrope"]),
        "mrope_interleaved": True,
    }
    vision.update(hidden_act="gelu_pytorch_tanh", in_channels=3)
    raw = {
        "model_type": "qwen3_vl_moe",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": special["image"],
        "video_token_id": special["video"],
        "vision_start_token_id": special["start"],
        "vision_end_token_id": special["end"],
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }
    return parse_config(raw)


def hf_config(shape: str, layers: int | None = None):
    """The transformers Qwen3VLMoeConfig of a benchmark shape (for side-by-side runs)."""
    from scripts.testkit.checkpoints import vl_config

    text, vision, special = shape_configs(shape, layers)
    return vl_config(text, vision, special, SHAPES[shape]["mrope"], rope_theta=5e6)


def save_result(path: str | None, result: dict) -> None:
    """Write a benchmark's result dict as JSON to `path` (--out), if given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def _materialize(module: torch.nn.Module, dtype: torch.dtype, device: str, seed: int):
    # The dtype is set while the module is still on the meta device (free), so the one allocation
    # is the target dtype on the target device: no fp32 copy to cast from.
    module = module.to(dtype).to_empty(device=device)
    randomize(module, seed, Init(std=0.02, norm_std=0.1, bias_std=0.02))
    return module.eval()


def random_text_model(
    config: ModelConfig, dtype: torch.dtype, device: str, seed: int = 0
) -> Qwen3MoeForCausalLM:
    """The language model with random weights, made on `device` (no checkpoint)."""
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config.text)
    return _materialize(model, dtype, device, seed)


def random_vision_model(
    config: ModelConfig, dtype: torch.dtype, device: str, seed: int = 1
) -> Qwen3VLVisionModel:
    """The vision tower with random weights, made on `device`."""
    with torch.device("meta"):
        model = Qwen3VLVisionModel(config.vision)
    return _materialize(model, dtype, device, seed)


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (before reading a clock)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_tokenizer(vocab: int) -> LanguageTokenizer:
    """A tokenizer with room for `vocab` ids (random prompts need ids, not words)."""
    return LanguageTokenizer(build_tokenizer(vocab_size=max(vocab, 300)), ())
