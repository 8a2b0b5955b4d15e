"""Write a block FP8 copy of a bf16 / fp32 checkpoint in transformers' fine-grained FP8 format,
the layout of Qwen's published FP8 checkpoints (Qwen3-VL-30B-A3B-Instruct-FP8):

    python -m scripts.quantize_fp8 models/shapes-vl /tmp/shapes-vl-fp8 [--scale-dtype bfloat16]

- config.json gains a top-level ``quantization_config``: ``{"quant_method": "fp8", "fmt":
  "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
  "modules_to_not_convert": [...]}`` naming every vision module with a weight matrix, every
  router (``mlp.gate``), ``lm_head`` and ``embed_tokens``;
- the language model's attention projections (and dense MLPs) become ``float8_e4m3fn`` with
  ``weight_scale_inv [ceil(out/128), ceil(in/128)]`` (partial blocks at the edges);
- the routed experts are written one per expert as plain ``[out, in]`` linears,
  ``mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`` + their scales, whatever expert
  layout the source has (hub fused, transformers-v5 fused or per expert);
- everything else (norms, routers, embeddings, lm_head, the vision tower) is copied as stored,
  so the vision fingerprint is the source's and its encode replicas serve the copy too.

Tokenizer, chat template, preprocessor and generation configs are copied. Output shards stay
under ``--shard-bytes`` (an index file when there are several).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from shared.kernels.reference import fp8_block_quantize
from shared.model.checkpoint import FusedExpertSource, Reader, checkpoint_files
from shared.model.config import Fp8Config, load_config

_LINEAR = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(?:gate_up_proj|down_proj|\d+\.\w+\.weight)$")
_ROUTER = re.compile(r"\.mlp\.gate\.weight$")
_COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


STAMP = ".fp8-source"  # in a cached copy: what it was made from


class QuantizeError(ValueError):
    """The source is not a float checkpoint this quantizer understands."""


def _not_converted(ranks: dict[str, int]) -> list[str]:
    """Module names kept in the model dtype (from each written tensor's rank): vision modules
    with a weight matrix, routers, lm_head and embed_tokens."""
    names = []
    for key, rank in ranks.items():
        module = key.removesuffix(".weight")
        vision = key.startswith("model.visual.") and key.endswith(".weight") and rank >= 2
        if vision or _ROUTER.search(key) or module == "lm_head" or module.endswith("embed_tokens"):
            names.append(module)
    return names


def _expert_tensors(
    reader: Reader, base: str, keys: set[str], shape: tuple[int, int, int], v5: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """One layer's experts as per-expert [out, in] weights, from any stored layout."""
    experts, hidden, inter = shape
    if f"{base}.gate_up_proj" in keys:
        gate_up = FusedExpertSource(f"{base}.gate_up_proj", (experts, hidden, 2 * inter), v5)
        down = FusedExpertSource(f"{base}.down_proj", (experts, inter, hidden), v5)
        gu, dn = gate_up.load(reader, None), down.load(reader, None)  # [E, H, 2I], [E, I, H]
        for e in range(experts):
            yield f"{base}.{e}.gate_proj.weight", gu[e, :, :inter].t()
            yield f"{base}.{e}.up_proj.weight", gu[e, :, inter:].t()
            yield f"{base}.{e}.down_proj.weight", dn[e].t()
        return
    for e in range(experts):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            key = f"{base}.{e}.{proj}.weight"
            yield key, reader.full(key)


def _quantized(key: str, weight: torch.Tensor, scale_dtype: torch.dtype) -> dict:
    if not weight.dtype.is_floating_point or weight.element_size() < 2:
        raise QuantizeError(f"{key}: {weight.dtype} is not a float weight to quantize")
    q, scale = fp8_block_quantize(weight)
    return {key: q, key.removesuffix("weight") + "weight_scale_inv": scale.to(scale_dtype)}


def quantized_tensors(
    model_dir: Path, scale_dtype: torch.dtype = torch.float32
) -> Iterator[dict[str, torch.Tensor]]:
    """The FP8 checkpoint's tensors, a few at a time (one layer's experts at most)."""
    config = load_config(model_dir)
    if config.quantization is not None:
        raise QuantizeError(f"{model_dir} is already quantized ({config.quantization.as_dict()})")
    files = checkpoint_files(model_dir)
    keys = set(files)
    text = config.text
    shape = (text.num_experts, text.hidden_size, text.moe_intermediate_size)
    reader = Reader(files)
    done: set[str] = set()
    try:
        for key in sorted(keys):
            experts = _EXPERTS.match(key)
            if experts:
                base = experts.group(1)
                if base not in done:
                    done.add(base)
                    layer = _expert_tensors(reader, base, keys, shape, config.written_by_v5)
                    out: dict[str, torch.Tensor] = {}
                    for name, weight in layer:
                        out.update(_quantized(name, weight, scale_dtype))
                    yield out
            elif _LINEAR.search(key) and not key.startswith("model.visual."):
                yield _quantized(key, reader.full(key), scale_dtype)
            else:
                yield {key: reader.full(key)}
    finally:
        reader.close()


def _write_shards(parts: Iterator[dict], out_dir: Path, shard_bytes: int) -> dict[str, int]:
    """Save the tensors in shards under `shard_bytes`; returns every key written, with its
    tensor's rank."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for part in parts:
        part_size = sum(t.numel() * t.element_size() for t in part.values())
        if shards[-1] and size + part_size > shard_bytes:
            shards.append({})
            size = 0
        shards[-1].update({k: t.contiguous() for k, t in part.items()})
        size += part_size
    ranks = {k: t.dim() for shard in shards for k, t in shard.items()}
    if len(shards) == 1:
        save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
        return ranks
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return ranks


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    scale_dtype: torch.dtype = torch.float32,
    shard_bytes: int = 4 << 30,
) -> Path:
    """Write the FP8 copy of `model_dir` to `out_dir` (created); returns `out_dir`."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = _write_shards(quantized_tensors(model_dir, scale_dtype), out_dir, shard_bytes)
    raw = json.loads((model_dir / "config.json").read_text())
    fp8 = Fp8Config(modules_to_not_convert=tuple(sorted(_not_converted(ranks))))
    raw["quantization_config"] = fp8.as_dict()
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for name in _COPIED:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    return out_dir


def _source_stamp(model_dir: Path) -> str:
    """What the copy was made from: the config's text and every weight file's size and time."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(set(checkpoint_files(model_dir).values())):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def cached_copy(model_dir: str | Path, cache_root: str | Path) -> Path:
    """The FP8 copy of `model_dir` under `cache_root/<name>`, written again whenever the source
    changed since (the demo's copy of a model being retrained stays current)."""
    model_dir = Path(model_dir).resolve()
    out = Path(cache_root) / model_dir.name
    stamp = _source_stamp(model_dir)
    if (out / STAMP).is_file() and (out / STAMP).read_text() == stamp:
        return out
    shutil.rmtree(out, ignore_errors=True)
    quantize_checkpoint(model_dir, out)
    (out / STAMP).write_text(stamp)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="source checkpoint directory (bf16 or fp32)")
    p.add_argument("out", type=Path, help="where to write the FP8 copy")
    p.add_argument(
        "--scale-dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the weight_scale_inv tensors (both are published)",
    )
    p.add_argument("--shard-bytes", type=int, default=4 << 30)
    args = p.parse_args(argv)
    scale_dtype = getattr(torch, args.scale_dtype)
    out = quantize_checkpoint(args.model, args.out, scale_dtype, args.shard_bytes)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
