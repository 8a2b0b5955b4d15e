"""Tile configurations of the fused-MoE kernels, tuned on one GPU: ``python -m bench.kernels_triton
--tune``.

For each token bucket M (the keys of the tables in ``shared/kernels/gpu/configs``), every
candidate tile configuration runs the whole routed-experts op (align, both GEMMs, the top-k sum)
on the project's weight layout, ``gate_up [E, H, 2I]`` and ``down [E, I, H]`` in bf16 (fp32 runs
the same table with half the K step), with random top-k routing. Each candidate is timed as a
CUDA graph over several layers of weights (each layer's data out of L2, as in serving); the
fastest wins. The table is written after every bucket to
``configs/E={E},N={I},device_name={device}.json``, so a time-limited run keeps what it
finished; ``--tokens`` picks the buckets. A full run compiles a few hundred variants per large
bucket: expect tens of minutes.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.kernels.gpu import tiles

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
SHARED_MEMORY_LIMIT = 227 * 1024  # bytes per block on sm_90 (H100, H200)
LAYER_COPIES = 4  # weight copies a pass cycles through: more than L2 holds at any bucket


@dataclass(frozen=True)
class MoeShape:
    """The routed experts of one model (one tensor-parallel rank's share)."""

    num_experts: int
    hidden: int
    inter: int
    top_k: int


def _pow2_up(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def candidates(num_tokens: int, shape: MoeShape, itemsize: int = 2) -> list[dict[str, int]]:
    """The tile configurations tried for a bucket: row blocks no taller than twice a used
    expert's mean row count (taller ones only pad), grouped launch order only where experts get
    16 rows or more, 8 warps only for tiles of 64 x 128 and up, and the gate/up kernel's
    pipelined tiles (the larger of the two GEMMs' footprints) within an sm_90 block's shared
    memory."""
    rows = num_tokens * shape.top_k
    per_expert = rows / min(shape.num_experts, rows)
    tallest = max(16, 2 * _pow2_up(per_expert))
    grid = itertools.product(
        [m for m in (16, 32, 64, 128) if m <= tallest],
        (32, 64, 128, 256),
        (64, 128, 256),
        (1, 4, 8, 16) if per_expert >= 16 else (1,),
        (4, 8),
        (2, 3, 4, 5),
    )
    found = []
    for m, n, k, group, warps, stages in grid:
        if warps == 8 and m * n < 64 * 128:
            continue
        if stages * (m * k + 2 * k * n) * itemsize > SHARED_MEMORY_LIMIT:
            continue
        if n > _pow2_up(shape.inter) or k > _pow2_up(shape.hidden):
            continue
        found.append(dict(zip(tiles.KEYS, (m, n, k, group, warps, stages), strict=True)))
    return found


def fastest(timings: list[tuple[dict[str, int], float]]) -> dict[str, int]:
    """The configuration of the least time (the earlier candidate among equal times)."""
    return min(timings, key=lambda pair: pair[1])[0]


def table_json(
    best: dict[int, dict[str, int]], device_name: str, kept: dict[int, dict[str, int]]
) -> dict:
    """The file's content: a note on its origin, then the entries by increasing M (the tuned
    ones, and those `kept` from an earlier file for buckets not tuned this time)."""
    tuned = ", ".join(str(m) for m in sorted(best))
    note = f"tuned by bench.kernels_triton --tune on {device_name} in bf16 at M = {tuned}"
    if set(kept) - set(best):
        note += "; the other entries kept from the file this run replaced"
    entries = {**kept, **best}
    return {"_comment": note, **{str(m): entries[m] for m in sorted(entries)}}


def write_table(
    best: dict[int, dict[str, int]], shape: MoeShape, device_name: str, directory: Path
) -> Path:
    """Write (or update) the shape's table for the device; returns its path."""
    path = directory / tiles.config_file_name(shape.num_experts, shape.inter, device_name)
    kept = {}
    if path.exists():
        kept = {int(m): e for m, e in json.loads(path.read_text()).items() if m.isdigit()}
    path.write_text(json.dumps(table_json(best, device_name, kept), indent=2) + "\n")
    return path


def tune(
    shape: MoeShape,
    buckets: list[int],
    time_config: Callable[[int, dict[str, int]], float],
    done: Callable[[dict[int, dict[str, int]]], None],
    log: Callable[[str], None] = print,
) -> dict[int, dict[str, int]]:
    """The fastest candidate per bucket; `time_config(M, config)` gives ms (raising on a
    configuration that does not compile or run), `done(best so far)` runs after each bucket."""
    best: dict[int, dict[str, int]] = {}
    for num_tokens in buckets:
        timings = []
        for config in candidates(num_tokens, shape):
            try:
                timings.append((config, time_config(num_tokens, config)))
            except Exception as exc:  # noqa: BLE001 - out of resources: not a candidate here
                log(f"  M={num_tokens} {config}: skipped ({type(exc).__name__})")
        if not timings:
            log(f"M={num_tokens}: no candidate ran; left out")
            continue
        best[num_tokens] = fastest(timings)
        ms = min(t for _, t in timings)
        log(f"M={num_tokens}: {best[num_tokens]} {ms * 1e3:.1f} us of {len(timings)} candidates")
        done(best)
    return best


def gpu_timer(shape: MoeShape, rounds: int) -> Callable[[int, dict[str, int]], float]:
    """Times one configuration at one bucket on the current GPU: per-layer ms of the routed
    experts, LAYER_COPIES weight copies cycled with their own routing each (CUDA only)."""
    from bench.gpu_timing import alternate
    from shared.kernels.gpu.moe_triton import fused_moe_triton

    dev, dt = torch.device("cuda"), torch.bfloat16
    e, h, i, k = shape.num_experts, shape.hidden, shape.inter, shape.top_k
    copies = range(LAYER_COPIES)
    gate_up = [torch.randn(e, h, 2 * i, device=dev, dtype=dt) * h**-0.5 for _ in copies]
    down = [torch.randn(e, i, h, device=dev, dtype=dt) * i**-0.5 for _ in copies]
    inputs: dict[int, list] = {}

    def time_config(num_tokens: int, config: dict[str, int]) -> float:
        if num_tokens not in inputs:
            inputs.clear()  # one bucket's activations at a time
            x = torch.randn(num_tokens, h, device=dev, dtype=dt)
            routes = []
            for _ in range(LAYER_COPIES):
                w, ids = torch.rand(num_tokens, e, device=dev).softmax(-1).topk(k, dim=-1)
                routes.append(((w / w.sum(-1, keepdim=True)).to(dt), ids))
            inputs[num_tokens] = [x, routes]
        x, routes = inputs[num_tokens]

        def run() -> None:
            for n, (w, ids) in enumerate(routes):
                fused_moe_triton(x, gate_up[n], down[n], w, ids, config=config)

        return alternate({"config": run}, rounds, LAYER_COPIES)["config"]

    return time_config


def run_tune(shape: MoeShape, tokens: list[int] | None, rounds: int, out_dir: str | None) -> int:
    """The --tune entry: every bucket (or `tokens`) of `shape` on the current GPU."""
    if not torch.cuda.is_available():
        print("bench.kernels_triton --tune needs a CUDA GPU and found none")
        return 2
    name = tiles.device_name(torch.device("cuda"))
    directory = Path(out_dir) if out_dir else tiles.CONFIG_DIR
    timer = gpu_timer(shape, rounds)
    best = tune(
        shape, tokens or list(BUCKETS), timer, lambda b: write_table(b, shape, name, directory)
    )
    print(f"wrote {directory / tiles.config_file_name(shape.num_experts, shape.inter, name)}")
    return 0 if best else 1
