"""The Triton block-FP8 kernels at Qwen3-VL-30B-A3B's shapes: both variants side by side with
the bf16 kernels, on one GPU (``python -m bench.kernels_triton --fp8``), and their launches for
``--compile-only`` (sm_90 on a CPU, no GPU needed).

The w8a8 / w8a16 choice (`shared.kernels.gpu.FP8_ACT_QUANT`) is what this measures: per token
count, the fused MoE in bf16, FP8 w8a8 and FP8 w8a16, and the attention projections (qkv 5120 x
2048, o 2048 x 4096) likewise, per-layer GPU times from CUDA graphs (`bench.gpu_timing`), each
layer with its own weights so none sits in L2.
"""

from __future__ import annotations

import torch

from bench.gpu_timing import alternate
from shared.kernels.reference import FP8_DTYPE, fp8_blocks

A3B_LINEARS = {"qkv": (5120, 2048), "o": (2048, 4096)}  # (out, in)
LINEAR_ROWS = (1, 16, 64, 1024)


def fp8_experts(experts: int, hidden: int, inter: int, device, empty: bool = False):
    """(gate_up, down, gate_up_scale, down_scale) in the model's FP8 layout (random e4m3
    values, or uninitialized for compiling)."""

    def weights(*shape):
        if empty:
            return torch.empty(*shape, dtype=FP8_DTYPE, device=device)
        return (torch.randn(*shape, device=device) * 0.5).to(FP8_DTYPE)

    nh, ni = fp8_blocks(hidden), fp8_blocks(inter)
    scale = torch.empty if empty else torch.rand
    return (
        weights(experts, hidden, 2 * inter),
        weights(experts, inter, hidden),
        scale(experts, nh, 2 * ni, device=device) * 1e-2,
        scale(experts, ni, nh, device=device) * 1e-2,
    )


def compile_fp8_launches(shape: dict, dt: torch.dtype, tokens: list[int]) -> None:
    """Every FP8 launch of the benchmark (both variants for 16-bit activations, the one the
    backend runs for fp32) and of a server's warm-up, in one activation dtype, on uninitialized
    CPU tensors (compiled, not run)."""
    from shared.kernels.gpu import fp8_act_quant, fp8_triton, moe_triton
    from shared.kernels.gpu.warmup import FP8_ROW_BUCKETS

    hidden, experts, top_k, inter = (shape[k] for k in ("hidden", "experts", "top_k", "inter"))
    gate_up, down, gate_up_scale, down_scale = fp8_experts(experts, hidden, inter, "cpu", True)
    rows = sorted({*tokens, *FP8_ROW_BUCKETS})
    for act_quant in {True, False} if dt.itemsize <= 2 else {fp8_act_quant(dt)}:
        for t in tokens:
            moe_triton.fused_moe_triton(
                torch.empty(t, hidden, dtype=dt),
                gate_up,
                down,
                torch.empty(t, top_k, dtype=dt),
                torch.zeros(t, top_k, dtype=torch.long),
                scales=(gate_up_scale, down_scale),
                act_quant=act_quant,
            )
        for out_features, in_features in A3B_LINEARS.values():
            weight = torch.empty(out_features, in_features, dtype=FP8_DTYPE)
            scale = torch.empty(fp8_blocks(out_features), fp8_blocks(in_features))
            for m in rows:
                x = torch.empty(m, in_features, dtype=dt)
                fp8_triton.fp8_linear_triton(x, weight, scale, act_quant)


def _moe_passes(x, weights, ids, fp8: list, bf16: list) -> dict:
    """One pass over every layer's experts per variant (None: bf16)."""
    from shared.kernels.gpu import moe_triton

    def variant(act_quant: bool | None):
        def one_pass():
            for (g, d, gs, ds), dense in zip(fp8, bf16, strict=True):
                if act_quant is None:
                    moe_triton.fused_moe_triton(x, *dense, weights, ids)
                else:
                    scales = (gs, ds)
                    moe_triton.fused_moe_triton(x, g, d, weights, ids, None, scales, act_quant)

        return one_pass

    return {"bf16": variant(None), "w8a8": variant(True), "w8a16": variant(False)}


def _linear_passes(x, fp8: list, scale, bf16: list) -> dict:
    """One pass over every layer's projection per variant (bf16: cuBLAS)."""
    from shared.kernels.gpu import fp8_triton

    def variant(act_quant: bool | None):
        def one_pass():
            if act_quant is None:
                for w in bf16:
                    torch.matmul(x, w.t())
            else:
                for w in fp8:
                    fp8_triton.fp8_linear_triton(x, w, scale, act_quant)

        return one_pass

    return {"bf16": variant(None), "w8a8": variant(True), "w8a16": variant(False)}


def bench_fp8(shape: dict, rounds: int, layers: int = 16) -> dict[str, dict[str, float]]:
    """Per-layer ms of bf16, FP8 w8a8 and FP8 w8a16, for the experts and the projections."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    hidden, experts, top_k, inter = (shape[k] for k in ("hidden", "experts", "top_k", "inter"))
    fp8 = [fp8_experts(experts, hidden, inter, dev) for _ in range(layers)]
    bf16 = [(g.to(dt), d.to(dt)) for g, d, *_ in fp8]
    results: dict[str, dict[str, float]] = {}
    for t in LINEAR_ROWS:
        x = torch.randn(t, hidden, device=dev, dtype=dt)
        w, ids = torch.randn(t, experts, device=dev).softmax(-1).topk(top_k, -1)
        passes = _moe_passes(x, w.to(dt), ids, fp8, bf16)
        results[f"moe T={t}"] = alternate(passes, rounds, layers)
    for name, (out_features, in_features) in A3B_LINEARS.items():
        weights = [
            (torch.randn(out_features, in_features, device=dev) * 0.5).to(FP8_DTYPE)
            for _ in range(layers)
        ]
        scale = torch.rand(fp8_blocks(out_features), fp8_blocks(in_features), device=dev)
        dense = [w.to(dt) for w in weights]
        for t in LINEAR_ROWS:
            x = torch.randn(t, in_features, device=dev, dtype=dt)
            passes = _linear_passes(x, weights, scale, dense)
            results[f"{name} M={t}"] = alternate(passes, rounds, layers)
    return results


def print_fp8(results: dict[str, dict[str, float]]) -> None:
    print(f"{'per layer':<16} {'bf16 ms':>9} {'w8a8 ms':>9} {'w8a16 ms':>9} {'w8a8/w8a16':>10}")
    for label, ms in results.items():
        ratio = ms["w8a16"] / ms["w8a8"]
        print(f"{label:<16} {ms['bf16']:9.4f} {ms['w8a8']:9.4f} {ms['w8a16']:9.4f} {ratio:9.2f}x")
