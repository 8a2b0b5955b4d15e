"""The tiny Qwen3-VL-MoE / Qwen3-MoE shapes of the parity tests (written by scripts.testkit)."""

from __future__ import annotations

from pathlib import Path

from scripts.testkit.checkpoints import (
    preprocessor_config,
    write_text_checkpoint,
    write_vl_checkpoint,
)
from scripts.testkit.checkpoints import vl_config as _vl_config

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
SPECIAL_IDS = {
    "image": IMAGE_TOKEN_ID,
    "video": VIDEO_TOKEN_ID,
    "start": VISION_START_ID,
    "end": VISION_END_ID,
}
PREPROCESSOR = preprocessor_config(32 * 32, 256 * 256)


def vl_config(text: dict | None = None, vision: dict | None = None, mrope=(6, 5, 5)):
    """The tiny transformers config, with overrides."""
    return _vl_config({**TEXT, **(text or {})}, {**VISION, **(vision or {})}, SPECIAL_IDS, mrope)


def make_vl_checkpoint(path: Path, seed: int = 0, text: dict | None = None, **kw):
    """Save a random HF Qwen3VLMoeForConditionalGeneration to `path`; return the HF model (fp32)."""
    return write_vl_checkpoint(path, vl_config(text=text, **kw), PREPROCESSOR, seed)


def make_text_checkpoint(path: Path, seed: int = 0, **overrides):
    """Save a random HF Qwen3MoeForCausalLM (text-only, 1-D RoPE) to `path`; return it."""
    return write_text_checkpoint(path, {**TEXT, **overrides}, seed)
