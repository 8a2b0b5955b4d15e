"""Block FP8 linears in Triton: out [M, N] = x [M, K] . W^T, W [N, K] in e4m3 as checkpoints
store it, one fp32 scale per 128x128 block (``weight_scale_inv [ceil(N/128), ceil(K/128)]``).

A program computes a [BLOCK_M, BLOCK_N] tile, walking K one 128-wide scale block per step
(BLOCK_K is 128), so each step's product takes one scale per column. W tiles are read with K
contiguous, the operand layout Hopper's FP8 MMA wants. Two variants (a constexpr):

- w8a8 (``ACT_QUANT``): each step quantizes its [BLOCK_M, 128] activation tile per row to e4m3
  (scale max|x| / 448: DeepSeek's and vLLM's per-token-group dynamic quantization, the group
  being the scale block) and runs an FP8 MMA, scaled by both scales;
- w8a16: each step widens its W tile to x's dtype and runs a bf16 (or fp32) MMA.

Activation quantization happens inside the GEMM, so neither variant adds a launch; the grid
comes from shapes alone and nothing is read back on the host (graph-safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shared.kernels.reference import FP8_BLOCK, FP8_MAX, fp8_blocks

# One 128-wide scale block of K per step: the activation group of w8a8, the weights' scale block.
BLOCK_K = FP8_BLOCK
_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def quantize_rows(a):
    """An activation tile [M, 128] -> (e4m3 tile, fp32 scale per row): a row of zeros gets a
    tiny scale and quantizes to zeros."""
    af = a.to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(af), axis=1), 1e-12) / _FP8_MAX
    return (af / scale[:, None]).to(tl.float8e4nv), scale


@triton.jit
def scaled_dot(a, w, w_scale, ACT_QUANT: tl.constexpr, PRECISION: tl.constexpr):
    """a [M, 128] (x's dtype) . w [128, N] (e4m3), times w_scale [N]: one K step in fp32."""
    if ACT_QUANT:
        aq, a_scale = quantize_rows(a)
        return tl.dot(aq, w) * (a_scale[:, None] * w_scale[None, :])
    return tl.dot(a, w.to(a.dtype), input_precision=PRECISION) * w_scale[None, :]


@triton.jit(do_not_specialize=["num_rows"])
def _fp8_linear_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] e4m3
    s_ptr,  # [ceil(N/128), ceil(K/128)] fp32
    out_ptr,  # [M, N]
    num_rows,
    out_features,
    in_features,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    ACT_QUANT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_rows, BLOCK_M)
    num_pid_n = tl.cdiv(out_features, BLOCK_N)
    per_group = GROUP_M * num_pid_n  # GROUP_M row tiles share each weight tile in L2
    first_m = (pid // per_group) * GROUP_M
    group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group
    pid_n = (pid % per_group) // group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < num_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % out_features  # wrapped columns stay in bounds; the store drops them
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    s_ptrs = s_ptr + (cols // BLOCK_K) * stride_sn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(in_features, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=rows_ok[:, None], other=0.0)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < in_features - k * BLOCK_K
            a = tl.load(x_ptrs, mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc += scaled_dot(a, w, tl.load(s_ptrs + k), ACT_QUANT, PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    mask = rows_ok[:, None] & (offs_n[None, :] < out_features)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


class Fp8ShapeError(ValueError):
    """The FP8 linear's operands do not fit together."""


def linear_config(num_rows: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes from the row count's bucket alone (few variants, one per bucket). Row tiles
    stop at 64 (32 for fp32 activations, whose [BLOCK_M, 128] tiles are twice the bytes) with a
    warp per 2 KiB of activation-sized outputs: the quantized tile sits in fp32 registers, and
    bigger tiles spill on sm_90 (`bench.kernels_triton --compile-only`)."""
    block_m = 16 if num_rows <= 16 else 32 if num_rows <= 32 else 64
    if dtype.itemsize > 2:
        block_m = max(16, block_m // 2)
    block_n = 64 if num_rows <= 64 else 128
    warps = max(4, block_m * block_n * dtype.itemsize // 2048)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "GROUP_M": 8, "num_warps": warps}


def fp8_linear_triton(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K] e4m3
    scale: torch.Tensor,  # [ceil(N/128), ceil(K/128)] fp32
    act_quant: bool = True,
) -> torch.Tensor:  # [M, N]
    """Same contract as ``shared.kernels.reference.fp8_linear_torch`` (``act_quant``: w8a8)."""
    if x.dim() != 2:
        out = fp8_linear_triton(x.reshape(-1, x.shape[-1]), weight, scale, act_quant)
        return out.view(*x.shape[:-1], -1)
    num_rows, in_features = x.shape
    out_features = weight.shape[0]
    expected = (fp8_blocks(out_features), fp8_blocks(in_features))
    if weight.shape[1] != in_features or tuple(scale.shape) != expected:
        raise Fp8ShapeError(
            f"weight {tuple(weight.shape)} and scale {tuple(scale.shape)} do not fit x "
            f"{tuple(x.shape)} (scale must be {expected})"
        )
    out = x.new_empty(num_rows, out_features)
    if num_rows == 0:
        return out
    x = x if x.stride(1) == 1 else x.contiguous()
    weight, scale = weight.contiguous(), scale.contiguous()
    cfg = linear_config(num_rows, x.dtype)
    grid = (triton.cdiv(num_rows, cfg["BLOCK_M"]) * triton.cdiv(out_features, cfg["BLOCK_N"]),)
    _fp8_linear_kernel[grid](
        x,
        weight,
        scale,
        out,
        num_rows,
        out_features,
        in_features,
        x.stride(0),
        weight.stride(0),
        scale.stride(0),
        out.stride(0),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=BLOCK_K,
        GROUP_M=cfg["GROUP_M"],
        EVEN_K=in_features % BLOCK_K == 0,
        ACT_QUANT=act_quant,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"],
        num_stages=3 if x.dtype.itemsize <= 2 else 2,
    )
    return out
