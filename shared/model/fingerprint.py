"""A short identity of a checkpoint's vision tower, the same wherever the directory is copied.

Both services compute it from their own model directory: the encode service advertises it and
the language service refuses replicas whose tower differs from the checkpoint it serves. It
hashes the name, dtype and shape of every vision tensor plus the bytes of the tower's last
projection (a few MiB even for the largest models): two checkpoints of one shape but different
weights differ there, and reading it costs milliseconds, not a pass over the weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open

from shared.model.checkpoint import checkpoint_files

_VISION_PREFIX = "model.visual."
_LAST_PROJECTION = ("model.visual.merger.linear_fc2.weight", "model.visual.merger.linear_fc2.bias")


def vision_fingerprint(model_dir: str | Path) -> str:
    """sha256 hex (first 16 characters) of the vision tower's layout and last projection;
    empty for a checkpoint without a vision tower."""
    files = checkpoint_files(model_dir)
    names = sorted(k for k in files if k.startswith(_VISION_PREFIX))
    if not names:
        return ""
    digest = hashlib.sha256()
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for path, keys in sorted(by_file.items()):
        with safe_open(path, "pt") as f:
            for key in keys:
                piece = f.get_slice(key)
                digest.update(f"{key}:{piece.get_dtype()}:{piece.get_shape()};".encode())
                if key in _LAST_PROJECTION:
                    tensor = f.get_tensor(key).contiguous()
                    digest.update(tensor.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]
