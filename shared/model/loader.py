"""Load Hugging Face checkpoint directories into the model classes.

The model is built on the meta device and each parameter is filled from the safetensors shards, so
peak
memory stays near the model's size. Only the tensors of the requested part are read: the encode side
never
touches the language weights and vice versa. Expert weights come in three layouts, all accepted:
hub fused (`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`), transformers-v5 fused (the transposes)
and the
per-expert text layout (`experts.{e}.{gate,up,down}_proj.weight`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from shared.model.config import ModelConfig, load_config
from shared.model.qwen3_moe import Qwen3MoeForCausalLM
from shared.model.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration
from shared.model.vision import Qwen3VLVisionModel

log = logging.getLogger(__name__)

_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint's tensors do not match the model: missing, unexpected or mis-shaped."""


@dataclass(frozen=True)
class _Source:
    keys: tuple[str, ...]
    build: Callable[[list[torch.Tensor]], torch.Tensor]


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """Map every tensor name to its safetensors file (single file or sharded with an index)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"no model.safetensors or model.safetensors.index.json in {model_dir}"
        )
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def _fused_expert(
    name: str, target: torch.Size, square_is_v5: bool
) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """Accept hub [E, A, B] as is, or the v5 transpose [E, B, A].

    When A == B the shape cannot tell; `square_is_v5` (from the writer's transformers version)
    decides, since transformers 5 transposes on save and the 4.x-era hub checkpoints do not.
    """

    def build(ts: list[torch.Tensor]) -> torch.Tensor:
        t = ts[0]
        if target[1] == target[2] and t.shape == target:
            log.warning(
                "%s: square expert matrices; assuming the %s layout",
                name,
                "transformers-v5" if square_is_v5 else "hub",
            )
            return t.transpose(1, 2).contiguous() if square_is_v5 else t
        if t.shape == target:
            return t
        if t.dim() == 3 and t.shape == (target[0], target[2], target[1]):
            return t.transpose(1, 2).contiguous()
        raise CheckpointError(
            f"{name}: shape {tuple(t.shape)} is neither {tuple(target)} nor its transpose"
        )

    return build


def _expert_source(
    ckpt_base: str, kind: str, keys: dict[str, Path], target: torch.Size, square_is_v5: bool
) -> _Source:
    fused = f"{ckpt_base}.{kind}"
    if fused in keys:
        return _Source((fused,), _fused_expert(fused, target, square_is_v5))
    num_experts = target[0]
    if kind == "gate_up_proj":
        names = [
            f"{ckpt_base}.{e}.{p}_proj.weight" for e in range(num_experts) for p in ("gate", "up")
        ]

        def build(ts: list[torch.Tensor]) -> torch.Tensor:
            # Each expert: [gate.T | up.T] -> [H, 2I].
            pairs = [
                torch.cat([g.t(), u.t()], dim=1) for g, u in zip(ts[0::2], ts[1::2], strict=True)
            ]
            return torch.stack(pairs)

        return _Source(tuple(names), build)
    names = [f"{ckpt_base}.{e}.down_proj.weight" for e in range(num_experts)]
    return _Source(tuple(names), lambda ts: torch.stack([d.t() for d in ts]))


def _plan(
    module: nn.Module,
    prefixes: list[tuple[str, str]],
    keys: dict[str, Path],
    skip: set[str],
    square_is_v5: bool,
) -> dict[str, _Source]:
    """For each of the module's parameters, which checkpoint tensors build it and how."""
    plan: dict[str, _Source] = {}
    for our, param in module.named_parameters():
        if our in skip:
            continue
        ckpt = next(
            (c + our[len(o) :] for o, c in prefixes if our.startswith(o)),
            None,
        )
        if ckpt is None:
            raise CheckpointError(f"no checkpoint prefix maps parameter {our}")
        m = _EXPERT.match(ckpt)
        if m:
            plan[our] = _expert_source(m.group(1), m.group(2), keys, param.shape, square_is_v5)
        elif our.endswith("patch_embed.proj.weight"):
            # Conv3d [out, C, T, P, P] on disk, a Linear [out, C*T*P*P] here.
            plan[our] = _Source((ckpt,), lambda ts: ts[0].reshape(ts[0].shape[0], -1))
        else:
            plan[our] = _Source((ckpt,), lambda ts: ts[0])
    return plan


def _set_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, leaf, nn.Parameter(value, requires_grad=False))


def load_weights(
    module: nn.Module,
    model_dir: str | Path,
    prefixes: list[tuple[str, str]],
    dtype: torch.dtype,
    device: str | torch.device,
    skip: set[str] | None = None,
    square_is_v5: bool = False,
) -> None:
    """Fill `module` (built on meta) from the checkpoint; `prefixes` maps (our prefix, checkpoint
    prefix).

    Parameters in `skip` (a tied lm_head) are left for the caller.
    """
    keys = checkpoint_files(model_dir)
    plan = _plan(module, prefixes, keys, skip or set(), square_is_v5)
    wanted: dict[str, str] = {k: our for our, src in plan.items() for k in src.keys}
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
    by_file: dict[Path, list[str]] = {}
    for k in wanted:
        by_file.setdefault(keys[k], []).append(k)
    staged: dict[str, torch.Tensor] = {}
    targets = dict(module.named_parameters())
    done: set[str] = set()
    files = sorted(by_file)
    for path in tqdm(files, desc="Loading shards", unit="shard", disable=len(files) < 2):
        with safe_open(path, "pt", device="cpu") as f:
            for k in by_file[path]:
                staged[k] = f.get_tensor(k)
        for our, src in plan.items():
            if our in done or not all(k in staged for k in src.keys):
                continue
            value = src.build([staged.pop(k) for k in src.keys])
            if value.shape != targets[our].shape:
                raise CheckpointError(
                    f"{src.keys[0]}: shape {tuple(value.shape)} but the model expects "
                    f"{tuple(targets[our].shape)} for {our}"
                )
            _set_parameter(module, our, value.to(device=device, dtype=dtype))
            done.add(our)
    log.info("loaded %d tensors from %s (%d file(s))", len(done), model_dir, len(files))


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


def load_text_model(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Qwen3MoeForCausalLM:
    """The language side: `Qwen3MoeForCausalLM` with only the text tensors read."""
    config = load_config(model_dir)
    model = _build(Qwen3MoeForCausalLM, config.text, False)
    load_weights(
        model, model_dir, _text_prefixes(config), dtype, device, _skip(config), config.written_by_v5
    )
    return _finish(model, config.tie_word_embeddings)


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
    load_weights(model, model_dir, prefixes, dtype, device, _skip(config), config.written_by_v5)
    return _finish(model, config.tie_word_embeddings)


def _untied(config: ModelConfig) -> ModelConfig:
    """Build untied on meta; `_finish` ties after loading so the shared tensor is real."""
    from dataclasses import replace

    return replace(config, tie_word_embeddings=False)
