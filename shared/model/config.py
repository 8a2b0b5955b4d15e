"""Frozen model configurations parsed from a Hugging Face config.json.

Two dialects exist in the wild: transformers 4.57 writes `rope_scaling` + `rope_theta` inside
`text_config`,
transformers 5.x writes `rope_parameters`. Both parse to the same `TextConfig`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.wire.units import DTYPES

VL_MODEL_TYPES = ("qwen3_vl_moe",)
TEXT_MODEL_TYPES = ("qwen3_moe",)


class ModelConfigError(ValueError):
    """config.json is missing, unsupported, or internally inconsistent."""


@dataclass(frozen=True)
class TextConfig:
    """The language model's architecture (shared by Qwen3-VL-MoE and text-only Qwen3-MoE)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None: plain 1-D RoPE. Otherwise (t, h, w) frequency-slot counts summing to head_dim / 2.
    mrope_section: tuple[int, int, int] | None
    mrope_interleaved: bool
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    intermediate_size: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    max_position_embeddings: int
    hidden_act: str = "silu"

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` uses the sparse MoE block (else a dense MLP)."""
        return (
            layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


@dataclass(frozen=True)
class VisionConfig:
    """The Qwen3-VL vision tower's architecture."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per patch row of pixel_values: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def num_deepstack(self) -> int:
        return len(self.deepstack_visual_indexes)


@dataclass(frozen=True)
class Fp8Config:
    """config.json's ``quantization_config`` of a block FP8 checkpoint (transformers'
    fine-grained FP8, the format of Qwen's published FP8 checkpoints): e4m3 weights with one
    scale per 128x128 block, activations quantized dynamically (or not: the choice is each
    kernel's), ``modules_to_not_convert`` kept in the model dtype."""

    modules_to_not_convert: tuple[str, ...] = ()
    activation_scheme: str = "dynamic"
    fmt: str = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)
    quant_method: str = "fp8"

    def as_dict(self) -> dict[str, Any]:
        """The ``quantization_config`` entry of config.json."""
        return {
            "quant_method": self.quant_method,
            "fmt": self.fmt,
            "activation_scheme": self.activation_scheme,
            "weight_block_size": list(self.weight_block_size),
            "modules_to_not_convert": list(self.modules_to_not_convert),
        }


def parse_quantization(raw: dict[str, Any] | None) -> Fp8Config | None:
    """The checkpoint's quantization, or None for a float checkpoint; refuses what the kernels
    cannot run."""
    if not raw:
        return None
    method = raw.get("quant_method")
    if method != "fp8":
        raise ModelConfigError(
            f"config.json: quantization_config quant_method {method!r} is not supported (only "
            "fp8: transformers' fine-grained FP8, as Qwen publishes its FP8 checkpoints)"
        )
    block = tuple(int(b) for b in raw.get("weight_block_size") or ())
    fmt = str(raw.get("fmt", "e4m3"))
    if block != (128, 128) or fmt != "e4m3":
        raise ModelConfigError(
            f"config.json: FP8 with weight_block_size {list(block)} and fmt {fmt!r} is not "
            "supported (only [128, 128] blocks of e4m3)"
        )
    if raw.get("scale_fmt", "float") != "float":
        raise ModelConfigError("config.json: only float FP8 scales (scale_fmt 'float')")
    return Fp8Config(
        modules_to_not_convert=tuple(raw.get("modules_to_not_convert") or ()),
        activation_scheme=str(raw.get("activation_scheme", "dynamic")),
    )


@dataclass(frozen=True)
class ModelConfig:
    """A whole checkpoint's configuration: text model, optional vision tower, special token ids."""

    model_type: str
    text: TextConfig
    vision: VisionConfig | None
    tie_word_embeddings: bool
    dtype: torch.dtype
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    # Which transformers wrote config.json; decides the fused-expert layout when shapes cannot.
    transformers_version: str | None = None
    quantization: Fp8Config | None = None  # None: float weights throughout

    @property
    def is_vl(self) -> bool:
        return self.vision is not None

    @property
    def num_deepstack(self) -> int:
        return 0 if self.vision is None else self.vision.num_deepstack

    @property
    def vision_pad_ids(self) -> frozenset[int]:
        """The token ids whose rows are vision embeddings: image and video pads (none for a
        text-only model). A video's temporal groups are pictures of their own to the model."""
        if not self.is_vl:
            return frozenset()
        return frozenset(t for t in (self.image_token_id, self.video_token_id) if t is not None)

    @property
    def written_by_v5(self) -> bool:
        """Written by transformers >= 5, whose save_pretrained transposes fused experts."""
        major = (self.transformers_version or "4").split(".")[0]
        return major.isdigit() and int(major) >= 5


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ModelConfigError(f"config.json: {where} has no '{key}'")
    return d[key]


def _rope_fields(text: dict[str, Any]) -> tuple[float, tuple[int, int, int] | None, bool]:
    """(rope_theta, mrope_section, mrope_interleaved) from either dialect."""
    params = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling") or {}
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ModelConfigError(
            f"config.json: unsupported rope_type '{rope_type}' (only default RoPE)"
        )
    theta = merged.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise ModelConfigError("config.json: no rope_theta (neither rope_parameters nor top-level)")
    section = merged.get("mrope_section")
    section = tuple(int(s) for s in section) if section else None
    return float(theta), section, bool(merged.get("mrope_interleaved", False))


def parse_text_config(text: dict[str, Any], is_vl: bool) -> TextConfig:
    """Build a TextConfig from a text_config dict (VL) or a flat Qwen3-MoE config dict."""
    where = "text_config" if is_vl else "config"
    hidden = int(_require(text, "hidden_size", where))
    heads = int(_require(text, "num_attention_heads", where))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    theta, section, interleaved = _rope_fields(text)
    num_experts = int(text.get("num_experts", text.get("num_local_experts", 0)) or 0)
    cfg = TextConfig(
        vocab_size=int(_require(text, "vocab_size", where)),
        hidden_size=hidden,
        num_hidden_layers=int(_require(text, "num_hidden_layers", where)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        mrope_section=section if is_vl else None,
        mrope_interleaved=interleaved,
        num_experts=num_experts,
        num_experts_per_tok=int(text.get("num_experts_per_tok", 0) or 0),
        moe_intermediate_size=int(text.get("moe_intermediate_size", 0) or 0),
        intermediate_size=int(text.get("intermediate_size", 0) or 0),
        # Qwen3-VL-MoE always renormalizes the top-k weights; Qwen3-MoE text honours the flag.
        norm_topk_prob=True if is_vl else bool(text.get("norm_topk_prob", False)),
        decoder_sparse_step=int(text.get("decoder_sparse_step", 1) or 1),
        mlp_only_layers=tuple(int(i) for i in (text.get("mlp_only_layers") or ())),
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
        hidden_act=str(text.get("hidden_act", "silu")),
    )
    _check_text(cfg)
    return cfg


def _check_text(cfg: TextConfig) -> None:
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ModelConfigError(
            f"num_attention_heads ({cfg.num_attention_heads}) is not a multiple of "
            f"num_key_value_heads ({cfg.num_key_value_heads})"
        )
    if cfg.head_dim % 2:
        raise ModelConfigError(f"head_dim must be even for RoPE, got {cfg.head_dim}")
    if cfg.mrope_section is not None:
        if len(cfg.mrope_section) != 3 or sum(cfg.mrope_section) != cfg.head_dim // 2:
            raise ModelConfigError(
                f"mrope_section {list(cfg.mrope_section)} must have 3 entries summing to "
                f"head_dim/2 = {cfg.head_dim // 2}"
            )
    if cfg.hidden_act != "silu":
        raise ModelConfigError(f"unsupported text hidden_act '{cfg.hidden_act}' (only silu)")
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    if moe_layers and not (0 < cfg.num_experts_per_tok <= cfg.num_experts):
        raise ModelConfigError(
            f"num_experts_per_tok ({cfg.num_experts_per_tok}) must be in 1..num_experts "
            f"({cfg.num_experts})"
        )
    if moe_layers and cfg.moe_intermediate_size <= 0:
        raise ModelConfigError("moe_intermediate_size must be positive for MoE layers")
    if len(moe_layers) < cfg.num_hidden_layers and cfg.intermediate_size <= 0:
        raise ModelConfigError("intermediate_size must be positive when some layers are dense")


def parse_vision_config(vision: dict[str, Any], text: TextConfig) -> VisionConfig:
    """Build a VisionConfig from a vision_config dict and check it against the text model."""
    rope = vision.get("rope_parameters") or {}
    cfg = VisionConfig(
        depth=int(_require(vision, "depth", "vision_config")),
        hidden_size=int(_require(vision, "hidden_size", "vision_config")),
        num_heads=int(_require(vision, "num_heads", "vision_config")),
        intermediate_size=int(_require(vision, "intermediate_size", "vision_config")),
        in_channels=int(vision.get("in_channels", 3)),
        patch_size=int(vision.get("patch_size", 16)),
        temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
        spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
        out_hidden_size=int(_require(vision, "out_hidden_size", "vision_config")),
        num_position_embeddings=int(vision.get("num_position_embeddings", 2304)),
        deepstack_visual_indexes=tuple(int(i) for i in vision.get("deepstack_visual_indexes", ())),
        hidden_act=str(vision.get("hidden_act", "gelu_pytorch_tanh")),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )
    side = math.isqrt(cfg.num_position_embeddings)
    if side * side != cfg.num_position_embeddings:
        raise ModelConfigError(
            f"num_position_embeddings ({cfg.num_position_embeddings}) is not square"
        )
    if cfg.hidden_size % cfg.num_heads or cfg.head_dim % 4:
        raise ModelConfigError(
            f"vision hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} must give a "
            "head_dim divisible by 4"
        )
    if cfg.out_hidden_size != text.hidden_size:
        raise ModelConfigError(
            f"vision out_hidden_size ({cfg.out_hidden_size}) != "
            f"text hidden_size ({text.hidden_size})"
        )
    if any(not 0 <= i < cfg.depth for i in cfg.deepstack_visual_indexes):
        raise ModelConfigError(
            f"deepstack_visual_indexes {list(cfg.deepstack_visual_indexes)} out of range for "
            f"depth {cfg.depth}"
        )
    if cfg.num_deepstack > text.num_hidden_layers:
        raise ModelConfigError("more deepstack layers than text decoder layers")
    return cfg


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """Parse a config.json dict (either dialect) for Qwen3-VL-MoE or Qwen3-MoE."""
    model_type = raw.get("model_type")
    dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    dtype = DTYPES.get(str(dtype_name), torch.bfloat16)
    if model_type in VL_MODEL_TYPES:
        text_raw = dict(_require(raw, "text_config", "config"))
        text = parse_text_config(text_raw, is_vl=True)
        if text.mrope_section is None:
            raise ModelConfigError("config.json: Qwen3-VL-MoE text_config needs an mrope_section")
        vision = parse_vision_config(_require(raw, "vision_config", "config"), text)
        return ModelConfig(
            model_type=model_type,
            text=text,
            vision=vision,
            # The top-level flag decides tying; text_config's v5 class default (true) does not.
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            dtype=dtype,
            image_token_id=int(raw.get("image_token_id", 151655)),
            video_token_id=int(raw.get("video_token_id", 151656)),
            vision_start_token_id=int(raw.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(raw.get("vision_end_token_id", 151653)),
            transformers_version=raw.get("transformers_version"),
            quantization=parse_quantization(raw.get("quantization_config")),
        )
    if model_type in TEXT_MODEL_TYPES:
        return ModelConfig(
            model_type=model_type,
            text=parse_text_config(raw, is_vl=False),
            vision=None,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            dtype=dtype,
            transformers_version=raw.get("transformers_version"),
            quantization=parse_quantization(raw.get("quantization_config")),
        )
    supported = ", ".join(VL_MODEL_TYPES + TEXT_MODEL_TYPES)
    raise ModelConfigError(
        f"config.json: unsupported model_type '{model_type}' (supported: {supported})"
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and parse `model_dir/config.json`."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"no config.json in {model_dir}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path} is not valid JSON: {e}") from e
    return parse_config(raw)
