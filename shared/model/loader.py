"""Load Hugging Face checkpoint directories into the model classes.

The model is built on the meta device and each parameter is filled from the safetensors files,
so peak memory stays near the model's size (or a tensor-parallel rank's share of it: sharded
parameters are read as slices). Only the tensors of the requested part are read: the encode
side never touches the language weights and vice versa. Expert weights come in three layouts,
all accepted: hub fused (`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`), transformers-v5
fused (the transposes) and the per-expert text layout (`experts.{e}.{gate,up,down}_proj.weight`).
Block FP8 checkpoints (config.json's ``quantization_config``, as Qwen publishes them): the FP8
modules are swapped in before loading, their e4m3 weights and fp32 scales read as stored.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from shared.kernels.reference import FP8_DTYPE, fp8_blocks
from shared.model.checkpoint import (
    BlockScaleSource,
    CheckpointError,
    FusedExpertSource,
    PerExpertDownSource,
    PerExpertGateUpSource,
    PlainSource,
    Reader,
    Shard,
    checkpoint_files,
)
from shared.model.config import ModelConfig, load_config
from shared.model.fp8 import QUANTIZATIONS, quantize_fp8, resident_bytes, use_fp8
from shared.model.qwen3_moe import Qwen3MoeForCausalLM
from shared.model.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration
from shared.model.vision import Qwen3VLVisionModel

log = logging.getLogger(__name__)

_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_EXPERT_SOURCES = (FusedExpertSource, PerExpertGateUpSource, PerExpertDownSource)
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(_scale_inv)?$")
_SCALE = "_scale_inv"


def _expert_source(
    ckpt_base: str,
    kind: str,
    keys: dict[str, Path],
    target: torch.Size,
    square_is_v5: bool,
    scales: bool,
):
    """`target`: the full shape of the expert weight (the scales' too: they follow it)."""
    fused = f"{ckpt_base}.{kind}"
    if fused + _SCALE in keys:
        raise CheckpointError(
            f"{fused}{_SCALE}: fused FP8 experts are not supported; FP8 checkpoints as Qwen "
            "publishes them store each expert's projections apart (experts.{e}.gate_proj...)"
        )
    if fused in keys and not scales:
        return FusedExpertSource(fused, target, square_is_v5)
    if kind == "gate_up_proj":
        return PerExpertGateUpSource(ckpt_base, target[0], target[2] // 2, scales)
    return PerExpertDownSource(ckpt_base, target[0], target[1], scales)


def _ckpt_name(our: str, prefixes: list[tuple[str, str]]) -> str:
    ckpt = next((c + our[len(o) :] for o, c in prefixes if our.startswith(o)), None)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint prefix maps parameter {our}")
    return ckpt


def _plan(
    module: nn.Module,
    prefixes: list[tuple[str, str]],
    keys: dict[str, Path],
    skip: set[str],
    square_is_v5: bool,
) -> dict[str, object]:
    """For each of the module's parameters, the source that reads it from the checkpoint."""
    shapes = {name: p.shape for name, p in module.named_parameters()}
    plan = {}
    for our in shapes:
        if our in skip:
            continue
        ckpt = _ckpt_name(our, prefixes)
        m = _EXPERT.match(ckpt)
        if m:
            weight = shapes[our.removesuffix(_SCALE)]
            scales = m.group(3) is not None
            plan[our] = _expert_source(m.group(1), m.group(2), keys, weight, square_is_v5, scales)
        elif ckpt.endswith(".weight" + _SCALE):
            plan[our] = BlockScaleSource(ckpt, ckpt.removesuffix(_SCALE))
        else:
            # Conv3d [out, C, T, P, P] on disk, a Linear [out, C*T*P*P] here.
            plan[our] = PlainSource(ckpt, flatten=our.endswith("patch_embed.proj.weight"))
    return plan


def stored_fp8(prefixes: list[tuple[str, str]], keys: dict[str, Path]):
    """Whether the checkpoint holds a module (by our name) in FP8: its scales are there."""

    def stored(module_name: str) -> bool:
        ckpt = _ckpt_name(module_name + ".", prefixes)
        candidates = ("weight", "0.gate_proj.weight", "gate_up_proj")
        return any(ckpt + c + _SCALE in keys for c in candidates)

    return stored


def _set_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, leaf, nn.Parameter(value, requires_grad=False))


def _check_keys(model_dir, plan: dict, keys: dict[str, Path], prefixes) -> None:
    wanted = {k for src in plan.values() for k in src.keys}
    missing = sorted(k for k in wanted if k not in keys)
    if missing:
        raise CheckpointError(
            f"checkpoint {model_dir} lacks {len(missing)} tensor(s), e.g. {', '.join(missing[:5])}"
        )
    ckpt_prefixes = tuple(c for _, c in prefixes)
    unexpected = sorted(
        k
        for k in keys
        if k.startswith(ckpt_prefixes) and k not in wanted and not _IGNORED.search(k)
    )
    if unexpected:
        raise CheckpointError(
            f"checkpoint {model_dir} has {len(unexpected)} unexpected tensor(s) for this model, "
            f"e.g. {', '.join(unexpected[:5])}"
        )


def load_weights(
    module: nn.Module,
    model_dir: str | Path,
    prefixes: list[tuple[str, str]],
    dtype: torch.dtype,
    device: str | torch.device,
    skip: set[str] | None = None,
    square_is_v5: bool = False,
    shards: Mapping[str, Shard] | None = None,
    expert_dtype: torch.dtype | None = None,
) -> Counter[str]:
    """Fill `module` (built on meta, full shapes) from the checkpoint; returns the bytes read
    per checkpoint tensor.

    `prefixes` maps (our prefix, checkpoint prefix). Parameters in `skip` (a tied lm_head) are
    left for the caller. A parameter in `shards` gets only its slice, read as a slice. The
    routed experts' weights get `expert_dtype` where given, everything else `dtype`.
    """
    shards = shards or {}
    keys = checkpoint_files(model_dir)
    plan = _plan(module, prefixes, keys, skip or set(), square_is_v5)
    _check_keys(model_dir, plan, keys, prefixes)
    targets = {name: tuple(p.shape) for name, p in module.named_parameters()}
    # FP8 weights stay e4m3 and their scales fp32, whatever the model dtype
    fixed = {
        name: p.dtype
        for name, p in module.named_parameters()
        if p.dtype == FP8_DTYPE or name.endswith(_SCALE)
    }
    reader = Reader(keys)
    files = {keys[src.keys[0]] for src in plan.values()}
    try:
        for our, src in tqdm(
            plan.items(), desc="Loading weights", unit="tensor", disable=len(files) < 2
        ):
            # A scale is read for its weight's shard
            shard = shards.get(our.removesuffix(_SCALE) if our.endswith(_SCALE) else our)
            value = src.load(reader, shard)
            expected = _expected_shape(targets, shards, our)
            if tuple(value.shape) != expected:
                raise CheckpointError(
                    f"{src.keys[0]}: shape {tuple(value.shape)} but the model expects "
                    f"{expected} for {our}"
                )
            if fixed.get(our) == FP8_DTYPE and value.dtype != FP8_DTYPE:
                raise CheckpointError(f"{src.keys[0]}: {value.dtype}, expected {FP8_DTYPE}")
            target = expert_dtype if expert_dtype and isinstance(src, _EXPERT_SOURCES) else dtype
            target = fixed.get(our, target)
            _set_parameter(module, our, value.to(device=device, dtype=target))
    finally:
        reader.close()
    log.info("loaded %d tensors from %s (%d file(s))", len(plan), model_dir, len(files))
    return reader.bytes_read


def _local_shape(targets: dict, shards: Mapping[str, Shard], name: str) -> list[int]:
    shape = list(targets[name])
    shard = shards.get(name)
    if shard is not None:
        shape[shard.dim] = shard.size
    return shape


def _expected_shape(targets: dict, shards: Mapping[str, Shard], name: str) -> tuple[int, ...]:
    """A parameter's shape on this rank; a scale's from its weight's: blocks of the last two
    dimensions (fused gate_up: of each half)."""
    if not name.endswith(_SCALE):
        return tuple(_local_shape(targets, shards, name))
    *lead, rows, cols = _local_shape(targets, shards, name.removesuffix(_SCALE))
    blocks = [*lead, fp8_blocks(rows), fp8_blocks(cols)]
    if name.endswith("gate_up_proj" + _SCALE):
        blocks[-1] = 2 * fp8_blocks(cols // 2)
    return tuple(blocks)


def _build(cls, *args) -> nn.Module:
    with torch.device("meta"):
        return cls(*args)


def _text_prefixes(config: ModelConfig) -> list[tuple[str, str]]:
    body = "model.language_model." if config.is_vl else "model."
    return [("model.", body), ("lm_head.", "lm_head.")]


def _skip(config: ModelConfig) -> set[str]:
    return {"lm_head.weight"} if config.tie_word_embeddings else set()


def _finish(module: nn.Module, tie: bool) -> nn.Module:
    if tie:
        module.lm_head.weight = module.model.embed_tokens.weight
    return module.eval()


def _prepare_fp8(model: nn.Module, config: ModelConfig, model_dir, prefixes) -> None:
    """An FP8 checkpoint's modules, swapped in on meta before loading."""
    if config.quantization is None:
        return
    count = use_fp8(model, stored_fp8(prefixes, checkpoint_files(model_dir)))
    log.info("%s: %d modules stored in FP8 (128x128 blocks of e4m3)", model_dir, count)


def build_text_model(config: ModelConfig, model_dir: str | Path) -> Qwen3MoeForCausalLM:
    """The language model on the meta device, full shapes, untied (tied after loading), with
    the FP8 modules of an FP8 checkpoint."""
    model = _build(Qwen3MoeForCausalLM, config.text, False)
    _prepare_fp8(model, config, model_dir, _text_prefixes(config))
    return model


def text_plan_args(config: ModelConfig) -> tuple[list[tuple[str, str]], set[str], bool]:
    """(prefixes, skipped parameters, square experts are v5) for `load_weights` of the text
    model."""
    return _text_prefixes(config), _skip(config), config.written_by_v5


def finish_text_model(
    model: Qwen3MoeForCausalLM, config: ModelConfig, quantization: str | None = None
) -> Qwen3MoeForCausalLM:
    """Tie lm_head to the embedding when the checkpoint says so; quantize (``"fp8"``) what the
    checkpoint stores in float; eval mode."""
    model = _finish(model, config.tie_word_embeddings)
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization {quantization!r} is not one of {QUANTIZATIONS}")
        count = quantize_fp8(model)
        if count:
            log.info("quantized %d modules to FP8 at load (128x128 blocks of e4m3)", count)
    log.info("language model weights: %.1f MiB resident", resident_bytes(model) / 2**20)
    return model


def load_text_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    expert_dtype: torch.dtype | None = None,
    quantization: str | None = None,
) -> Qwen3MoeForCausalLM:
    """The language side: `Qwen3MoeForCausalLM` with only the text tensors read (the routed
    experts' weights in `expert_dtype` where given; an FP8 checkpoint's FP8 modules as they
    are, and with ``quantization="fp8"`` a float checkpoint's quantized after loading)."""
    config = load_config(model_dir)
    model = build_text_model(config, model_dir)
    prefixes, skip, square_is_v5 = text_plan_args(config)
    load_weights(
        model, model_dir, prefixes, dtype, device, skip, square_is_v5, expert_dtype=expert_dtype
    )
    return finish_text_model(model, config, quantization)


def load_vision_model(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Qwen3VLVisionModel:
    """The encode side: `Qwen3VLVisionModel` with only the vision tensors read."""
    config = load_config(model_dir)
    if config.vision is None:
        raise CheckpointError(f"{model_dir} is a text-only checkpoint; it has no vision tower")
    model = _build(Qwen3VLVisionModel, config.vision)
    load_weights(model, model_dir, [("", "model.visual.")], dtype, device)  # no experts
    return model.eval()


def load_vl_model(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Qwen3VLMoeForConditionalGeneration:
    """The monolithic `Qwen3VLMoeForConditionalGeneration` (tests and tools)."""
    config = load_config(model_dir)
    model = _build(Qwen3VLMoeForConditionalGeneration, _untied(config))
    prefixes = [("visual.", "model.visual.")] + _text_prefixes(config)
    _prepare_fp8(model, config, model_dir, prefixes)
    load_weights(model, model_dir, prefixes, dtype, device, _skip(config), config.written_by_v5)
    return _finish(model, config.tie_word_embeddings)


def _untied(config: ModelConfig) -> ModelConfig:
    """Build untied on meta; `_finish` ties after loading so the shared tensor is real."""
    from dataclasses import replace

    return replace(config, tie_word_embeddings=False)
