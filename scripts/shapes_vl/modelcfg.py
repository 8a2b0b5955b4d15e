"""Architecture and processor settings of the small shapes model, written as the hub files are.

config.json is written in the 4.57 dialect (`rope_scaling` + `rope_theta` in text_config), which the
official Qwen3-VL-MoE checkpoints use, plus the v5 `rope_parameters`, so both versions read it.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class SmallModelConfig:
    """Sizes of the small model. Defaults are the shipped checkpoint's."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    num_experts: int = 16
    num_experts_per_tok: int = 2
    # 2 * 96 != 128, so the expert tensors' hub layout [E, H, 2I] never reads as [E, 2I, H].
    moe_intermediate_size: int = 96
    rope_theta: float = 10000.0
    mrope_section: tuple[int, int, int] = (6, 5, 5)
    max_position_embeddings: int = 4096
    vision_depth: int = 4
    vision_hidden_size: int = 128
    vision_num_heads: int = 4
    vision_intermediate_size: int = 512
    # 16x16 grid of learned positions, interpolated to each image's patch grid.
    num_position_embeddings: int = 256
    # Two deepstack levels (not the 3 of the big models) keep code honest about reading k.
    deepstack_visual_indexes: tuple[int, ...] = (1, 2)
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    min_pixels: int = 96 * 96
    max_pixels: int = 128 * 128
    # Video: pixel budgets of the whole sampled clip (frames x height x width), not of a frame.
    # Four frames of 96 x 96 at least; up to twelve frames (six temporal groups) keep 128 x 128
    # frames, longer clips get smaller frames. Sampled at 2 frames per second, 4 to 16 frames.
    video_min_pixels: int = 4 * 96 * 96
    video_max_pixels: int = 12 * 128 * 128
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 16


def padded_vocab_size(num_tokens: int, multiple: int = 64) -> int:
    """Vocabulary rows rounded up, as the real checkpoints pad theirs."""
    return -(-num_tokens // multiple) * multiple


def hf_config_dict(cfg: SmallModelConfig, vocab_size: int, special_ids: dict[str, int]) -> dict:
    """config.json content for Qwen3VLMoeForConditionalGeneration."""
    rope_scaling = {
        "rope_type": "default",
        "mrope_section": list(cfg.mrope_section),
        "mrope_interleaved": True,
    }
    text = {
        "model_type": "qwen3_vl_moe_text",
        "vocab_size": vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": 4 * cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "norm_topk_prob": True,
        "router_aux_loss_coef": 0.001,
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": special_ids["<|im_end|>"],
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": {**rope_scaling, "rope_theta": cfg.rope_theta},
        "dtype": "float32",
    }
    vision = {
        "model_type": "qwen3_vl_moe",
        "depth": cfg.vision_depth,
        "hidden_size": cfg.vision_hidden_size,
        "hidden_act": "gelu_pytorch_tanh",
        "intermediate_size": cfg.vision_intermediate_size,
        "num_heads": cfg.vision_num_heads,
        "in_channels": 3,
        "patch_size": cfg.patch_size,
        "spatial_merge_size": cfg.spatial_merge_size,
        "temporal_patch_size": cfg.temporal_patch_size,
        "out_hidden_size": cfg.hidden_size,
        "num_position_embeddings": cfg.num_position_embeddings,
        "deepstack_visual_indexes": list(cfg.deepstack_visual_indexes),
        "initializer_range": 0.02,
    }
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"],
        "model_type": "qwen3_vl_moe",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": special_ids["<|image_pad|>"],
        "video_token_id": special_ids["<|video_pad|>"],
        "vision_start_token_id": special_ids["<|vision_start|>"],
        "vision_end_token_id": special_ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "dtype": "float32",
    }


def preprocessor_config_dict(cfg: SmallModelConfig) -> dict:
    """preprocessor_config.json content, with min/max pixels in both spellings."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "patch_size": cfg.patch_size,
        "temporal_patch_size": cfg.temporal_patch_size,
        "merge_size": cfg.spatial_merge_size,
        "min_pixels": cfg.min_pixels,
        "max_pixels": cfg.max_pixels,
        "size": {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
    }


def video_preprocessor_config_dict(cfg: SmallModelConfig) -> dict:
    """video_preprocessor_config.json content in the released Qwen3-VL layout (the keys
    transformers' Qwen3VLVideoProcessor takes, plus fps and the frame bounds of its sampling)."""
    return {
        "video_processor_type": "Qwen3VLVideoProcessor",
        "processor_class": "Qwen3VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "do_sample_frames": True,
        "resample": 3,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "patch_size": cfg.patch_size,
        "temporal_patch_size": cfg.temporal_patch_size,
        "merge_size": cfg.spatial_merge_size,
        "size": {"shortest_edge": cfg.video_min_pixels, "longest_edge": cfg.video_max_pixels},
        "fps": cfg.video_fps,
        "min_frames": cfg.video_min_frames,
        "max_frames": cfg.video_max_frames,
    }


def generation_config_dict(special_ids: dict[str, int]) -> dict:
    """generation_config.json: greedy, stop at <|im_end|> (or <|endoftext|>)."""
    return {
        "bos_token_id": special_ids["<|endoftext|>"],
        "eos_token_id": [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]],
        "pad_token_id": special_ids["<|endoftext|>"],
        "do_sample": False,
    }
