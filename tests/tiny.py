"""Tiny random Qwen3-VL-MoE / Qwen3-MoE checkpoints written by transformers, for parity tests.

Every norm weight and bias is randomized (mistakes hide behind ones and zeros) and the other weights
get a
larger spread than transformers' init so logits are not all near-ties.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_TOKEN_ID = 300
VIDEO_TOKEN_ID = 301
VISION_START_ID = 302
VISION_END_ID = 303
VOCAB = 320

TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    moe_intermediate_size=48,  # 2I = 96 != H = 64: the expert layout is never ambiguous
    intermediate_size=80,
    num_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)
VISION = dict(
    depth=3,
    hidden_size=32,
    num_heads=2,
    intermediate_size=64,
    out_hidden_size=64,
    num_position_embeddings=64,
    deepstack_visual_indexes=[0, 2],
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
PREPROCESSOR = {
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
    "size": {"shortest_edge": 32 * 32, "longest_edge": 256 * 256},
    "image_processor_type": "Qwen2VLImageProcessor",
}


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.08) -> None:
    """Random weights everywhere, norms included (weights around 1, biases around 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def vl_config(text: dict | None = None, vision: dict | None = None, mrope=(6, 5, 5)):
    from transformers import Qwen3VLMoeConfig

    text_cfg = {
        **TEXT,
        **(text or {}),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": list(mrope),
            "mrope_interleaved": True,
        },
    }
    return Qwen3VLMoeConfig(
        text_config=text_cfg,
        vision_config={**VISION, **(vision or {})},
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
        tie_word_embeddings=False,
    )


def make_vl_checkpoint(path: Path, seed: int = 0, text: dict | None = None, **kw):
    """Save a random HF Qwen3VLMoeForConditionalGeneration to `path`; return the HF model (fp32)."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(vl_config(text=text, **kw)).eval()
    randomize(model, seed)
    model.save_pretrained(path)
    (Path(path) / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return model


def make_text_checkpoint(path: Path, seed: int = 0, **overrides):
    """Save a random HF Qwen3MoeForCausalLM (text-only, 1-D RoPE) to `path`; return it."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(**{**TEXT, **overrides})
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg).eval()
    randomize(model, seed)
    model.save_pretrained(path)
    return model
