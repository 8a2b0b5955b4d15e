"""Writing the small model as a hub-style checkpoint directory, and reading safetensors headers.

transformers 5.x keeps fused expert weights as `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]`
and saves them that way; the published Qwen3-VL-MoE checkpoints store `[E, H, 2I]` and `[E, I, H]`.
The shipped checkpoint uses the published layout so every loader meets what real checkpoints hold.
transformers 5.x reads both: its qwen3_vl_moe conversion mapping transposes an expert tensor on load
when its shape differs from the parameter's (`Transpose(1, 2, check_dims=True)`).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_FILE = "model.safetensors"
GATE_UP_SUFFIX = "mlp.experts.gate_up_proj"
DOWN_SUFFIX = "mlp.experts.down_proj"


class CheckpointError(ValueError):
    """Raised when a checkpoint file is malformed or its expert layout cannot be told apart."""


def read_safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {name: {dtype, shape, data_offsets}, ...}."""
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        header = f.read(header_len)
    if len(header) != header_len:
        raise CheckpointError(f"{path}: header truncated ({len(header)} of {header_len} bytes)")
    return json.loads(header)


def to_hub_layout(
    tensors: dict[str, torch.Tensor], hidden_size: int, moe_intermediate_size: int
) -> dict[str, torch.Tensor]:
    """Transpose fused expert tensors from transformers' in-memory layout to the hub layout."""
    if hidden_size == 2 * moe_intermediate_size:
        raise CheckpointError("hidden_size == 2 * moe_intermediate_size makes the layout ambiguous")
    out = {}
    for name, tensor in tensors.items():
        expected = None
        if name.endswith(GATE_UP_SUFFIX):
            expected = (2 * moe_intermediate_size, hidden_size)
        elif name.endswith(DOWN_SUFFIX):
            expected = (hidden_size, moe_intermediate_size)
        if expected is None:
            out[name] = tensor.contiguous()
            continue
        if tuple(tensor.shape[1:]) != expected:
            raise CheckpointError(f"{name}: shape {tuple(tensor.shape)}, expected [E, *{expected}]")
        out[name] = tensor.transpose(1, 2).contiguous()
    return out


def rewrite_in_hub_layout(model_dir: Path, hidden_size: int, moe_intermediate_size: int) -> None:
    """Rewrite `model_dir/model.safetensors` (as save_pretrained wrote it) in the hub layout."""
    path = model_dir / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found; save the model with one safetensors file first")
    tensors = load_file(str(path))
    save_file(
        to_hub_layout(tensors, hidden_size, moe_intermediate_size),
        str(path),
        metadata={"format": "pt"},
    )


def write_json(path: Path, content: dict) -> None:
    """Write `content` as indented JSON with a trailing newline."""
    path.write_text(json.dumps(content, indent=2) + "\n")
