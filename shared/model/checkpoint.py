"""Reading tensors out of safetensors checkpoints, whole or as one rank's slices.

A parameter is built from one or more checkpoint tensors by a *source*: a plain tensor (a
Conv3d patch embedding reshaped to a Linear), fused experts in the hub layout `[E, H, 2I]` /
`[E, I, H]` or transformers v5's transposes, or experts stored one by one (FP8 checkpoints:
their per-block scales too, sharded with their weights). Every source can read
a `Shard` (this rank's ranges along one dimension of the parameter) straight from the files with
`safe_open(...).get_slice`, so a tensor-parallel rank never materializes the tensors it does not
keep: a 30B-A3B rank reads its 1/N of the experts, not all of them.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from shared.kernels.reference import FP8_BLOCK, fp8_blocks

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint's tensors do not match the model: missing, unexpected or mis-shaped."""


@dataclass(frozen=True)
class Shard:
    """This rank's piece of a parameter: along `dim`, the concatenation of `ranges`."""

    dim: int
    ranges: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return sum(stop - start for start, stop in self.ranges)


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


class Reader:
    """Open safetensors files (each once) and read whole tensors or ranges of one dimension.

    `bytes_read` counts, per tensor name, the bytes actually read: what a rank loaded.
    """

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._handles: dict[Path, object] = {}
        self.bytes_read: Counter[str] = Counter()

    def _handle(self, key: str):
        path = self.files[key]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt", device="cpu")
        return self._handles[path]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def full(self, key: str) -> torch.Tensor:
        tensor = self._handle(key).get_tensor(key)
        self.bytes_read[key] += tensor.numel() * tensor.element_size()
        return tensor

    def part(self, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Indices [start, stop) of dimension `dim` (the other dimensions whole)."""
        piece = self._handle(key).get_slice(key)
        index = [slice(None)] * len(piece.get_shape())
        index[dim] = slice(start, stop)
        tensor = piece[tuple(index)]
        self.bytes_read[key] += tensor.numel() * tensor.element_size()
        return tensor

    def ranges(self, key: str, dim: int, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
        parts = [self.part(key, dim, a, b) for a, b in ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

    def close(self) -> None:
        self._handles.clear()


class PlainSource:
    """One checkpoint tensor as the parameter; `flatten` reshapes it 2-D (Conv3d -> Linear)."""

    def __init__(self, key: str, flatten: bool = False):
        self.keys = (key,)
        self.flatten = flatten

    def load(self, reader: Reader, shard: Shard | None) -> torch.Tensor:
        key = self.keys[0]
        tensor = reader.full(key) if shard is None else reader.ranges(key, shard.dim, shard.ranges)
        return tensor.reshape(tensor.shape[0], -1) if self.flatten else tensor


class FusedExpertSource:
    """Fused experts: hub `[E, A, B]` as is, or the v5 transpose `[E, B, A]`.

    When A == B the shape cannot tell; `square_is_v5` (the writer's transformers version)
    decides, since transformers 5 transposes on save and the 4.x-era hub checkpoints do not.
    """

    def __init__(self, key: str, target: Sequence[int], square_is_v5: bool):
        self.keys = (key,)
        self.target = tuple(target)  # the full (unsharded) parameter shape
        self.square_is_v5 = square_is_v5

    def _transposed(self, reader: Reader) -> bool:
        e, a, b = self.target
        shape = reader.shape(self.keys[0])
        if a == b and shape == self.target:
            log.warning(
                "%s: square expert matrices; assuming the %s layout",
                self.keys[0],
                "transformers-v5" if self.square_is_v5 else "hub",
            )
            return self.square_is_v5
        if shape == self.target:
            return False
        if shape == (e, b, a):
            return True
        raise CheckpointError(
            f"{self.keys[0]}: shape {shape} is neither {self.target} nor its transpose"
        )

    def load(self, reader: Reader, shard: Shard | None) -> torch.Tensor:
        key = self.keys[0]
        transposed = self._transposed(reader)
        if shard is None:
            tensor = reader.full(key)
        else:
            dim = {1: 2, 2: 1}.get(shard.dim, shard.dim) if transposed else shard.dim
            tensor = reader.ranges(key, dim, shard.ranges)
        return tensor.transpose(1, 2).contiguous() if transposed else tensor


def block_ranges(ranges: Sequence[tuple[int, int]], full: int, what: str) -> list[tuple[int, int]]:
    """Element ranges of a dimension of `full` elements -> the ranges of their FP8 scale
    blocks. A range must start on a 128 block and end on one or at the end: a rank cannot
    keep part of a block's rows with the whole block's scale."""
    blocks = []
    for a, b in ranges:
        if a % FP8_BLOCK or (b % FP8_BLOCK and b != full):
            raise CheckpointError(
                f"{what}: this rank's part [{a}, {b}) of {full} does not fall on the 128-wide "
                "blocks of the FP8 scales; use another --tensor-parallel-size, or "
                "--enable-expert-parallel for the experts"
            )
        blocks.append((a // FP8_BLOCK, fp8_blocks(b)))
    return blocks


class BlockScaleSource:
    """A linear's ``weight_scale_inv`` read for the weight's shard (given in weight rows or
    columns, converted to blocks)."""

    def __init__(self, key: str, weight_key: str):
        self.keys = (key,)
        self.weight_key = weight_key

    def load(self, reader: Reader, shard: Shard | None) -> torch.Tensor:
        key = self.keys[0]
        if shard is None:
            return reader.full(key)
        full = reader.shape(self.weight_key)[shard.dim]
        return reader.ranges(key, shard.dim, block_ranges(shard.ranges, full, self.weight_key))


class PerExpertGateUpSource:
    """`experts.{e}.gate_proj.weight` / `up_proj.weight` ([I, H] each) -> `[E, H, 2I]`; with
    `scales`, their ``weight_scale_inv`` ([ceil(I/128), ceil(H/128)]) -> ``[E, ceil(H/128),
    2 ceil(I/128)]`` for the same shard (given in weight columns)."""

    def __init__(self, base: str, num_experts: int, intermediate: int, scales: bool = False):
        self.base, self.num_experts, self.intermediate = base, num_experts, intermediate
        self.suffix = "weight_scale_inv" if scales else "weight"
        self.keys = tuple(
            f"{base}.{e}.{p}_proj.{self.suffix}" for e in range(num_experts) for p in ("gate", "up")
        )

    def load(self, reader: Reader, shard: Shard | None) -> torch.Tensor:
        inter = self.intermediate
        if shard is None or shard.dim == 0:
            gate_rows = up_rows = [(0, inter)]
        else:  # ranges of [0, 2I): below I they are gate rows, above I up rows
            gate_rows = [(a, b) for a, b in shard.ranges if b <= inter]
            up_rows = [(a - inter, b - inter) for a, b in shard.ranges if a >= inter]
        if self.suffix != "weight":
            gate_rows = block_ranges(gate_rows, inter, f"{self.base} gate_proj")
            up_rows = block_ranges(up_rows, inter, f"{self.base} up_proj")
        stacked = []
        for e in _experts_of(shard, self.num_experts):
            gate = reader.ranges(f"{self.base}.{e}.gate_proj.{self.suffix}", 0, gate_rows)
            up = reader.ranges(f"{self.base}.{e}.up_proj.{self.suffix}", 0, up_rows)
            stacked.append(torch.cat([gate.t(), up.t()], dim=1))
        return torch.stack(stacked)


class PerExpertDownSource:
    """`experts.{e}.down_proj.weight` ([H, I] each) -> `[E, I, H]`; with `scales`, their
    ``weight_scale_inv`` ([ceil(H/128), ceil(I/128)]) -> ``[E, ceil(I/128), ceil(H/128)]``."""

    def __init__(self, base: str, num_experts: int, intermediate: int, scales: bool = False):
        self.base, self.num_experts, self.intermediate = base, num_experts, intermediate
        self.suffix = "weight_scale_inv" if scales else "weight"
        self.keys = tuple(f"{base}.{e}.down_proj.{self.suffix}" for e in range(num_experts))

    def load(self, reader: Reader, shard: Shard | None) -> torch.Tensor:
        columns = None
        if shard is not None and shard.dim != 0:  # the parameter's dim 1 (I): stored dim 1
            columns = shard.ranges
            if self.suffix != "weight":
                columns = block_ranges(columns, self.intermediate, f"{self.base} down_proj")
        stacked = []
        for e in _experts_of(shard, self.num_experts):
            key = f"{self.base}.{e}.down_proj.{self.suffix}"
            tensor = reader.full(key) if columns is None else reader.ranges(key, 1, columns)
            stacked.append(tensor.t())
        return torch.stack(stacked)


def _experts_of(shard: Shard | None, num_experts: int) -> list[int]:
    if shard is None or shard.dim != 0:
        return list(range(num_experts))
    return [e for a, b in shard.ranges for e in range(a, b)]
