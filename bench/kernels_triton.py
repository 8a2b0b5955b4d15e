"""Triton kernels against their PyTorch references on one GPU: ``python -m bench.kernels_triton``.

Shapes are Qwen3-VL-30B-A3B's (hidden 2048, 128 experts top-8, moe_intermediate 768; 32 q / 4 kv
heads of 128, block size 16), bf16. Fused MoE runs for T = 1, 16, 64, 128, 1024 tokens; paged
decode for B = 1, 16, 64 sequences at contexts 1024 and 8192 (every sequence full).

Each measurement captures one pass over several "layers", each with its own weights or cache
and its own routing, in a CUDA graph, so the numbers are GPU time without Python launch cost
(the decode path replays graphs too) and no layer's data sits in L2 from the previous call:
there are enough layers to move at least ~512 MB per pass. Triton and reference alternate
within every round; the table gives per-layer medians. GB/s is the bytes a call must move at
least (the experts that got a token, or the K/V of every context, plus activations) over its
time; the H200's copy bandwidth is about 4.3 TB/s.

``--compile-only`` needs no GPU: it runs the same wrappers on uninitialized CPU tensors of the
benchmark's shapes with a stand-in driver for an sm_90 target, so every launch is compiled
exactly as the JIT would specialize it (and not run), then prints each kernel variant's
registers, spills and shared memory from its cubin and fails on spills or on more shared
memory than an H200 block can have.

``--tune`` (a GPU) times candidate fused-MoE tile configurations per token bucket and writes the
device's table under ``shared/kernels/gpu/configs`` (see `bench.moe_tune`).

``--fp8`` (a GPU) times the block-FP8 kernels, w8a8 and w8a16, beside bf16 (`bench.fp8_triton`);
``--compile-only`` compiles their launches too.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from bench.common import save_result
from bench.fp8_triton import bench_fp8, compile_fp8_launches, print_fp8
from bench.gpu_timing import alternate
from bench.moe_tune import MoeShape, run_tune

A3B = {
    "hidden": 2048,
    "experts": 128,
    "top_k": 8,
    "inter": 768,
    "heads": 32,
    "kv_heads": 4,
    "head_dim": 128,
    "block_size": 16,
}
BYTES_PER_PASS = 512 * 2**20
MAX_LAYERS = 128


def _layers(bytes_per_layer: float) -> int:
    return max(2, min(MAX_LAYERS, math.ceil(BYTES_PER_PASS / bytes_per_layer)))


def bench_moe(num_tokens: int, rounds: int, kernels, references) -> dict[str, float]:
    hidden, experts, top_k, inter = (A3B[k] for k in ("hidden", "experts", "top_k", "inter"))
    dev, dt = torch.device("cuda"), torch.bfloat16
    expert_bytes = (hidden * 2 * inter + inter * hidden) * 2
    layers = _layers(min(experts, num_tokens * top_k) * expert_bytes)
    x = torch.randn(num_tokens, hidden, device=dev, dtype=dt)
    weights, ids, needed = [], [], 0
    gate_up = [
        torch.randn(experts, hidden, 2 * inter, device=dev, dtype=dt) * hidden**-0.5
        for _ in range(layers)
    ]
    down = [
        torch.randn(experts, inter, hidden, device=dev, dtype=dt) * inter**-0.5
        for _ in range(layers)
    ]
    for _ in range(layers):
        scores = torch.rand(num_tokens, experts, device=dev)
        w, i = torch.topk(scores.softmax(-1), top_k, dim=-1)
        weights.append((w / w.sum(-1, keepdim=True)).to(dt))
        ids.append(i)
        needed += int(torch.unique(i).numel()) * expert_bytes + 2 * num_tokens * hidden * 2

    def run(fn):
        return lambda: [fn(x, gate_up[n], down[n], weights[n], ids[n]) for n in range(layers)]

    ms = alternate(
        {"triton": run(kernels.fused_moe), "torch": run(references["fused_moe"])}, rounds, layers
    )
    return {**ms, "gbps": {k: needed / layers / (v * 1e-3) / 1e9 for k, v in ms.items()}}


def bench_decode(batch: int, context: int, rounds: int, kernels, references) -> dict[str, float]:
    heads, kv_heads, dim, block = (A3B[k] for k in ("heads", "kv_heads", "head_dim", "block_size"))
    dev, dt = torch.device("cuda"), torch.bfloat16
    width = context // block
    kv_bytes = 2 * batch * context * kv_heads * dim * 2
    layers = _layers(kv_bytes)
    shape = (batch * width + 1, block, kv_heads, dim)
    k_cache = [torch.randn(shape, device=dev, dtype=dt) for _ in range(layers)]
    v_cache = [torch.randn(shape, device=dev, dtype=dt) for _ in range(layers)]
    tables = (torch.randperm(batch * width, device=dev).view(batch, width) + 1).int()  # as served
    lens = torch.full((batch,), context, device=dev, dtype=torch.long)
    q = torch.randn(batch, heads, dim, device=dev, dtype=dt)
    scale = dim**-0.5
    needed = kv_bytes + 2 * q.numel() * 2

    def run(fn):
        return lambda: [fn(q, k_cache[n], v_cache[n], tables, lens, scale) for n in range(layers)]

    ms = alternate(
        {"triton": run(kernels.paged_decode), "torch": run(references["paged_decode"])},
        rounds,
        layers,
    )
    return {**ms, "gbps": {k: needed / (v * 1e-3) / 1e9 for k, v in ms.items()}}


def _row(label: str, result: dict) -> str:
    t, r = result["triton"], result["torch"]
    gt, gr = result["gbps"]["triton"], result["gbps"]["torch"]
    return f"{label:<26} {t:9.4f} {r:9.4f} {r / t:7.2f}x {gt:10.0f} {gr:10.0f}"


H200_SHARED_LIMIT = 227 * 1024


class _Sm90Driver:
    """Just enough of a Triton driver to compile for an H200 without one."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import os
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    line = next(row for row in out.splitlines() if "REG:" in row)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    return {k: int(fields[k]) for k in ("REG", "STACK", "LOCAL")}


def _compile_launches(kernels, dt, tokens, batches, contexts) -> None:
    """Every launch the benchmark's shapes and the server's warm-up make, in one dtype."""
    hidden, experts, top_k, inter = (A3B[k] for k in ("hidden", "experts", "top_k", "inter"))
    gate_up = torch.empty(experts, hidden, 2 * inter, dtype=dt)
    down = torch.empty(experts, inter, hidden, dtype=dt)
    for t in tokens:
        kernels.fused_moe(
            torch.empty(t, hidden, dtype=dt),
            gate_up,
            down,
            torch.empty(t, top_k, dtype=dt),
            torch.zeros(t, top_k, dtype=torch.long),
        )
    heads, kv_heads, dim, block = (A3B[k] for k in ("heads", "kv_heads", "head_dim", "block_size"))
    scale = dim**-0.5
    for context in contexts:
        for b in batches:
            width = context // block
            cache = torch.empty(b * width + 1, block, kv_heads, dim, dtype=dt)
            kernels.paged_decode(
                torch.empty(b, heads, dim, dtype=dt),
                cache,
                cache,
                torch.zeros(b, width, dtype=torch.int32),  # the runner's tables
                torch.ones(b, dtype=torch.long),
                scale,
            )
    cache = torch.empty(128, block, kv_heads, dim, dtype=dt)
    table = torch.zeros(128, dtype=torch.int32)
    for start, n in [(0, 1066), (1000, 66), (0, 16)]:
        kv = torch.empty(n, kv_heads, dim, dtype=dt)
        kernels.paged_prefill(
            torch.empty(n, heads, dim, dtype=dt), kv, kv, cache, cache, table, start, scale
        )
    # What the server's start-up warm-up compiles: the small fused ops too, every MoE bucket.
    from shared.kernels.gpu.warmup import WarmupShapes, warm_up

    most = max(contexts) // block
    shapes = WarmupShapes(hidden, heads, kv_heads, dim, 1e-6, top_k, True, max(tokens), most)
    warm_up(shapes, cache, cache, cache.shape[0] - 1, (gate_up, down), dt)


def compile_only(
    tokens: list[int],
    batches: list[int],
    contexts: list[int],
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32),
) -> int:
    """Compile every launch of the benchmark for sm_90 on the CPU; report, fail on spills."""
    import triton.runtime.jit as jit
    from triton.runtime import driver

    from shared.kernels import gpu as kernels
    from shared.kernels.gpu import attention_triton, tiles

    compiled: dict[str, object] = {}
    run = jit.JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.setdefault(f"{self.__name__} {kernel.hash[:8]}", kernel)
        return kernel

    previous = driver._active  # reset_active() would look for a real GPU
    driver.set_active(_Sm90Driver())
    jit.JITFunction.run = compile_instead
    tiles.device_name = lambda device: "NVIDIA_H200"
    attention_triton._num_sms = lambda device: 132
    try:
        for dt in dtypes:  # bf16 for bf16 checkpoints; fp32 serves fp32 ones (the shipped model)
            _compile_launches(kernels, dt, tokens, batches, contexts)
            compile_fp8_launches(A3B, dt, tokens)
    finally:
        jit.JITFunction.run = run
        driver._active = previous
    failures = 0
    print(
        f"{'kernel variant':<32} {'warps':>5} {'stages':>6} {'regs':>4} {'spill B':>7} "
        f"{'shared KiB':>10}"
    )
    for name, kernel in compiled.items():
        use, md = _resource_usage(kernel.asm["cubin"]), kernel.metadata
        spill = use["STACK"] + use["LOCAL"]
        bad = spill > 0 or md.shared > H200_SHARED_LIMIT
        failures += bad
        print(
            f"{name:<32} {md.num_warps:>5} {md.num_stages:>6} {use['REG']:>4} {spill:>7} "
            f"{md.shared / 1024:>10.1f}{'  <-- over budget' if bad else ''}"
        )
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=None,
        help="fused-MoE token counts (default: 1 16 64 128 1024; with --tune, every bucket)",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="compile every launch for sm_90 on the CPU and report registers, "
        "spills and shared memory (no GPU needed)",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="time candidate MoE tile configs per token bucket and write the device's "
        "configs/E=...,N=...,device_name=....json (bench.moe_tune)",
    )
    parser.add_argument("--tune-dir", default=None, help="write the tuned table here instead")
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="time the block-FP8 kernels (w8a8 and w8a16) beside bf16 instead",
    )
    args = parser.parse_args(argv)
    if args.tune:
        shape = MoeShape(A3B["experts"], A3B["hidden"], A3B["inter"], A3B["top_k"])
        return run_tune(shape, args.tokens, args.rounds, args.tune_dir)
    args.tokens = args.tokens or [1, 16, 64, 128, 1024]
    if args.compile_only:
        return compile_only(args.tokens, args.batches, args.contexts)
    if not torch.cuda.is_available():
        print(
            "bench.kernels_triton needs a CUDA GPU and found none; the Triton kernels only "
            "run on CUDA (their CPU tests use Triton's interpreter).",
            file=sys.stderr,
        )
        return 2
    from shared.kernels import gpu as kernels
    from shared.kernels.gpu.attention_triton import num_splits
    from shared.kernels.reference import fused_moe_torch, paged_decode_torch

    if not kernels.available():
        print("bench.kernels_triton: triton is not installed", file=sys.stderr)
        return 2
    if args.fp8:
        results = bench_fp8(A3B, args.rounds)
        print_fp8(results)
        save_result(args.out, results)
        return 0
    references = {"fused_moe": fused_moe_torch, "paged_decode": paged_decode_torch}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, per-layer times")
    header = (
        f"{'':<26} {'triton ms':>9} {'torch ms':>9} {'speedup':>8} {'triton GB/s':>10} "
        f"{'torch GB/s':>10}"
    )
    print(header)
    results = {"fused_moe": {}, "paged_decode": {}}
    for tokens in args.tokens:
        result = bench_moe(tokens, args.rounds, kernels, references)
        results["fused_moe"][f"T={tokens}"] = result
        print(_row(f"fused MoE T={tokens}", result))
        torch.cuda.empty_cache()
    for context in args.contexts:
        for batch in args.batches:
            splits = num_splits(batch, A3B["kv_heads"], context, torch.device("cuda"))
            result = bench_decode(batch, context, args.rounds, kernels, references)
            results["paged_decode"][f"B={batch} ctx={context}"] = result
            print(_row(f"decode B={batch} ctx={context} s={splits}", result))
            torch.cuda.empty_cache()
    save_result(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
