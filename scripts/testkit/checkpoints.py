"""Random Qwen3-VL-MoE / Qwen3-MoE checkpoints written by transformers, of any shape.

One writer for the parity tests (tiny configs), the benchmarks (medium and full-size shapes)
and the transfer benchmark. Every norm weight and bias is randomized (mistakes hide behind ones
and zeros); the other weights get a chosen spread, so logits are not all near-ties.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Init:
    """Spreads of the random weights: norms around 1, biases and the rest around 0."""

    std: float = 0.08
    norm_std: float = 0.3
    bias_std: float = 0.1


def randomize(model: torch.nn.Module, seed: int = 0, init: Init = Init()) -> None:
    """Random weights everywhere, norms included, drawn from one seeded generator (on the
    parameters' device, so a full-size model on a GPU is filled there)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                offset, std = 1.0, init.norm_std
            else:
                offset, std = 0.0, init.bias_std if name.endswith("bias") else init.std
            # In place, in the parameter's own dtype: no temporary the size of the parameter (a
            # 30B-A3B expert tensor would be 1.6 GB of fp32 noise)
            p.normal_(offset, std, generator=gen)


def preprocessor_config(min_pixels: int, max_pixels: int) -> dict:
    """Qwen3-VL's preprocessor values (patch 16, merge 2, mean = std = 0.5) with pixel bounds."""
    return {
        "patch_size": 16,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 1 / 255,
        "do_rescale": True,
        "do_normalize": True,
        "do_resize": True,
        "resample": 3,
        "do_convert_rgb": True,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "image_processor_type": "Qwen2VLImageProcessor",
    }


def vl_config(
    text: dict,
    vision: dict,
    special_ids: dict[str, int],
    mrope: tuple[int, int, int],
    rope_theta: float = 10000.0,
):
    """A transformers Qwen3VLMoeConfig; `special_ids` has image, video, start and end."""
    from transformers import Qwen3VLMoeConfig

    text_cfg = {
        **text,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": list(mrope),
            "mrope_interleaved": True,
        },
    }
    return Qwen3VLMoeConfig(
        text_config=text_cfg,
        vision_config=vision,
        image_token_id=special_ids["image"],
        video_token_id=special_ids["video"],
        vision_start_token_id=special_ids["start"],
        vision_end_token_id=special_ids["end"],
        tie_word_embeddings=False,
    )


def write_vl_checkpoint(
    path: Path,
    config,
    preprocessor: dict,
    seed: int = 0,
    init: Init = Init(),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Save a random HF Qwen3VLMoeForConditionalGeneration of `config` to `path`; return it."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3VLMoeForConditionalGeneration(config).to(dtype).eval()
    randomize(model, seed, init)
    model.save_pretrained(path)
    (Path(path) / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return model


def write_text_checkpoint(path: Path, text: dict, seed: int = 0, init: Init = Init()):
    """Save a random HF Qwen3MoeForCausalLM (text-only, 1-D RoPE) to `path`; return it."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**text)).eval()
    randomize(model, seed, init)
    model.save_pretrained(path)
    return model
