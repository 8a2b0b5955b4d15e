"""Tile configurations for the fused-MoE kernels, read from ``configs/`` as vLLM keeps them.

One JSON file per (number of experts E, intermediate size N, device name):
``E=128,N=768,device_name=NVIDIA_H200.json``. Each maps a token count M to the launch
parameters of both GEMMs; a call takes the entry whose M is nearest to its own. Keys that are
not numbers (``_comment``, ``_derived_from``: where a table came from) are notes, not entries.
``python -m bench.kernels_triton --tune`` writes these files on a GPU. Without a file
for the shape and device, ``default.json`` applies, and where the JSON files were not installed
at all, the same default kept here. The lookup runs on the host from shapes alone, so a
captured graph always replays the tiles it was captured with.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_FILE = "default.json"
KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")

log = logging.getLogger(__name__)


def _entry(m: int, n: int, k: int, group: int, warps: int, stages: int) -> dict[str, int]:
    return dict(zip(KEYS, (m, n, k, group, warps, stages), strict=True))


# default.json's content (a test keeps the two equal), for installs without the data files.
BUILTIN_DEFAULT = {
    1: _entry(16, 64, 64, 1, 4, 3),
    16: _entry(16, 64, 64, 1, 4, 3),
    64: _entry(16, 64, 64, 1, 4, 3),
    256: _entry(32, 64, 64, 4, 4, 3),
    1024: _entry(64, 64, 64, 8, 4, 3),
    4096: _entry(64, 128, 64, 8, 8, 3),
}


class TileConfigError(ValueError):
    """A tile configuration file is malformed."""


@functools.cache
def device_name(device: torch.device) -> str:
    """The device's name as config files spell it (``NVIDIA_H200``); ``cpu`` off CUDA."""
    if device.type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).replace(" ", "_")


def config_file_name(num_experts: int, intermediate: int, name: str) -> str:
    return f"E={num_experts},N={intermediate},device_name={name}.json"


@functools.cache
def _load(path: Path) -> dict[int, dict[str, int]]:
    raw = json.loads(path.read_text())
    table: dict[int, dict[str, int]] = {}
    for m, entry in raw.items():
        if not m.isdigit():  # a note about the table
            continue
        missing = [key for key in KEYS if key not in entry]
        if missing:
            raise TileConfigError(f"{path.name}: entry M={m} lacks {', '.join(missing)}")
        table[int(m)] = {key: int(entry[key]) for key in KEYS}
    if not table:
        raise TileConfigError(f"{path.name}: no entries")
    return table


@functools.cache
def table_for(num_experts: int, intermediate: int, name: str) -> dict[int, dict[str, int]]:
    """The per-M table for a shape and device: its own file if there is one, else the default."""
    for path in (
        CONFIG_DIR / config_file_name(num_experts, intermediate, name),
        CONFIG_DIR / DEFAULT_FILE,
    ):
        if path.exists():
            return _load(path)
    log.warning("no tile configs under %s; using the built-in default", CONFIG_DIR)
    return BUILTIN_DEFAULT


def moe_config(
    num_experts: int,
    intermediate: int,
    num_tokens: int,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, int]:
    """Launch parameters for ``num_tokens`` tokens: the entry with the nearest M. The tables are
    tuned for 2-byte weights; fp32 halves BLOCK_SIZE_K, keeping each tile's bytes (at the bf16
    depth the largest fp32 variants spill registers)."""
    table = table_for(num_experts, intermediate, device_name(device))
    nearest = min(table, key=lambda m: (abs(m - num_tokens), m))
    entry = table[nearest]
    if dtype.itemsize > 2:
        entry = {**entry, "BLOCK_SIZE_K": max(16, entry["BLOCK_SIZE_K"] // 2)}
    return entry
