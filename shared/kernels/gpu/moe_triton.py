"""Routed experts in Triton: align rows per expert, two grouped GEMMs, a top-k-ordered sum.

Row ``r = t * k + j`` is token t's j-th expert choice. The align step (`moe_align`) lays the rows
out grouped by expert in BLOCK_M-row blocks of one expert each. Rows of id E (routed to no
expert: a step's padding tokens) are left out of it, so no expert's weights are read for them,
and the sum gives their tokens zeros. Both GEMMs launch a grid sized from shapes alone (an upper
bound on the number of blocks) and let programs past the real block count exit, so nothing is
read back on the host and the whole op can be graph-captured.

- GEMM 1 gathers x rows inside the kernel, reads gate and up tiles of ``gate_up [E, H, 2I]`` in
  place and writes ``silu(gate) * up`` to row r of ``[T * k, I]``.
- GEMM 2 multiplies by ``down [E, I, H]``, scales by the routing weight and writes row r of
  ``[T * k, H]``; a small kernel then sums each token's k rows in top-k order (no atomics).

Block FP8 experts (``FP8``): the same tensors in e4m3 with one fp32 scale per 128x128 block
(gate and up blocked apart, up's column blocks after gate's). Both GEMMs then step K one scale
block at a time (BLOCK_K 128) and take each step's product through `fp8_triton.scaled_dot`:
w8a8 (each activation tile quantized per row inside the kernel) or w8a16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shared.kernels.gpu import tiles
from shared.kernels.gpu.fp8_triton import BLOCK_K as FP8_BLOCK_K
from shared.kernels.gpu.fp8_triton import scaled_dot
from shared.kernels.gpu.moe_align import align_block_size
from shared.kernels.reference import fp8_blocks


@triton.jit
def _block_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M consecutive row blocks share each weight column tile in L2."""
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group
    pid_n = (pid % per_group) // group
    return pid_m, pid_n


# The sizes vary with the step; specializing on them (a value of 1, a multiple of 16) would
# compile several copies of each kernel per tile configuration.
@triton.jit(do_not_specialize=["num_rows", "max_blocks"])
def _gate_up_kernel(
    x_ptr,  # [T, H]
    w_ptr,  # [E, H, 2I]
    out_ptr,  # [num_rows, I]
    sorted_ptr,
    block_expert_ptr,
    num_blocks_ptr,
    num_rows,
    hidden,
    inter,
    max_blocks,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wk,
    stride_wn,
    stride_or,
    s_ptr,  # FP8: [E, ceil(H/128), 2 ceil(I/128)] fp32
    stride_se,
    stride_sk,
    up_blocks,  # FP8: the first column block of up's scales
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    FP8: tl.constexpr,
    ACT_QUANT: tl.constexpr,
):
    pid_m, pid_n = _block_ids(tl.program_id(0), max_blocks, tl.cdiv(inter, BLOCK_N), GROUP_M)
    if pid_m >= tl.load(num_blocks_ptr):
        return
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < num_rows
    tokens = (rows // TOP_K).to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % inter  # wrapped columns stay in bounds; the store drops them
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xh
    g_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            k_ok = offs_k < hidden - k * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        if FP8:  # BLOCK_K is the scale block: one scale per column this step
            s_row = s_ptr + expert * stride_se + k * stride_sk + cols // BLOCK_K
            acc_g += scaled_dot(a, g, tl.load(s_row), ACT_QUANT, PRECISION)
            acc_u += scaled_dot(a, u, tl.load(s_row + up_blocks), ACT_QUANT, PRECISION)
        else:
            acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_or + offs_n[None, :]
    tl.store(
        out_ptrs, h.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < inter)
    )


@triton.jit(do_not_specialize=["num_rows", "max_blocks"])
def _down_kernel(
    a_ptr,  # [num_rows, I]
    w_ptr,  # [E, I, H]
    out_ptr,  # [num_rows, H]
    weights_ptr,  # [num_rows] routing weight of each row
    sorted_ptr,
    block_expert_ptr,
    num_blocks_ptr,
    num_rows,
    inter,
    hidden,
    max_blocks,
    stride_ar,
    stride_we,
    stride_wk,
    stride_wn,
    stride_or,
    s_ptr,  # FP8: [E, ceil(I/128), ceil(H/128)] fp32
    stride_se,
    stride_sk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    FP8: tl.constexpr,
    ACT_QUANT: tl.constexpr,
):
    pid_m, pid_n = _block_ids(tl.program_id(0), max_blocks, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    if pid_m >= tl.load(num_blocks_ptr):
        return
    rows = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < num_rows
    rows64 = rows.to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows64[:, None] * stride_ar + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(inter, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < inter - k * BLOCK_K
            a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if FP8:
            scale = tl.load(s_ptr + expert * stride_se + k * stride_sk + cols // BLOCK_K)
            acc += scaled_dot(a, w, scale, ACT_QUANT, PRECISION)
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    route = tl.load(weights_ptr + rows64, mask=valid, other=0.0).to(tl.float32)
    acc = acc * route[:, None]
    out_ptrs = out_ptr + rows64[:, None] * stride_or + offs_n[None, :]
    tl.store(
        out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < hidden)
    )


@triton.jit(do_not_specialize=["num_tokens"])
def _topk_sum_kernel(
    terms_ptr,  # [T * k, H]
    ids_ptr,  # [T * k]: rows of id num_experts have no term (never written)
    out_ptr,  # [T, H]
    num_tokens,
    num_experts,
    hidden,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t] = terms[t*k] + terms[t*k + 1] + ... in that order, in fp32."""
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_ok = tokens < num_tokens
    mask = token_ok[:, None] & (cols < hidden)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        rows = tokens * TOP_K + j
        routed = tl.load(ids_ptr + rows, mask=token_ok, other=num_experts) < num_experts
        term = tl.load(
            terms_ptr + rows[:, None] * hidden + cols[None, :],
            mask=mask & routed[:, None],
            other=0.0,
        )
        acc += term.to(tl.float32)
    tl.store(
        out_ptr + tokens[:, None] * hidden + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs would run as tf32 on tensor cores by default; "ieee" keeps them exact.
    return "ieee" if dtype == torch.float32 else "tf32"


class MoeShapeError(ValueError):
    """The fused-MoE operands do not fit together."""


def _check(x, gate_up, down, weights, ids, scales) -> None:
    num_tokens, hidden = x.shape
    num_experts, w_hidden, two_inter = gate_up.shape
    if w_hidden != hidden or two_inter % 2:
        raise MoeShapeError(f"gate_up {tuple(gate_up.shape)} does not fit x {tuple(x.shape)}")
    if tuple(down.shape) != (num_experts, two_inter // 2, hidden):
        raise MoeShapeError(f"down {tuple(down.shape)} does not fit gate_up {tuple(gate_up.shape)}")
    if scales is not None:
        inter = two_inter // 2
        want = (num_experts, fp8_blocks(hidden), 2 * fp8_blocks(inter))
        want_down = (num_experts, fp8_blocks(inter), fp8_blocks(hidden))
        if tuple(scales[0].shape) != want or tuple(scales[1].shape) != want_down:
            raise MoeShapeError(
                f"FP8 scales {tuple(scales[0].shape)} and {tuple(scales[1].shape)} are not the "
                f"128-blocks {want} and {want_down} of the experts"
            )
    if ids.shape != weights.shape or ids.shape[0] != num_tokens:
        raise MoeShapeError(
            f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must "
            f"both be [T={num_tokens}, k]"
        )


def fp8_tiles(cfg: dict[str, int], dtype: torch.dtype) -> dict[str, int]:
    """A bf16 table entry adapted to FP8 experts: a K step is one 128-deep scale block, and the
    activation tile's quantization holds it in fp32 registers, so row tiles stop at 64 (32 for
    fp32 activations, twice the bytes) and take a warp per KiB of activation-sized outputs:
    else they spill on sm_90 (`bench.kernels_triton --compile-only`)."""
    cfg = {**cfg, "BLOCK_SIZE_K": FP8_BLOCK_K}
    if dtype.itemsize > 2:
        cfg["BLOCK_SIZE_M"] = max(16, cfg["BLOCK_SIZE_M"] // 2)
    cfg["BLOCK_SIZE_M"] = min(cfg["BLOCK_SIZE_M"], 64)
    warps = cfg["BLOCK_SIZE_M"] * cfg["BLOCK_SIZE_N"] * dtype.itemsize // 1024
    cfg["num_warps"] = min(16, max(cfg["num_warps"], warps))
    return cfg


def fused_moe_triton(
    x: torch.Tensor,  # [T, H]
    gate_up: torch.Tensor,  # [E, H, 2I]
    down: torch.Tensor,  # [E, I, H]
    weights: torch.Tensor,  # [T, k]
    ids: torch.Tensor,  # [T, k], E: no expert
    config: dict[str, int] | None = None,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    act_quant: bool = True,
) -> torch.Tensor:  # [T, H]
    """Same contract as ``shared.kernels.reference.fused_moe_torch``; ``config`` overrides the
    tile configuration (the tuner, the start-up warm-up). With ``scales`` (gate_up's, down's)
    the experts are block FP8: ``fused_moe_fp8_torch``'s contract (``act_quant``: w8a8)."""
    _check(x, gate_up, down, weights, ids, scales)
    num_tokens, hidden = x.shape
    num_experts, inter = gate_up.shape[0], gate_up.shape[2] // 2
    top_k = ids.shape[1]
    num_rows = num_tokens * top_k
    out = x.new_empty(num_tokens, hidden)
    if num_tokens == 0:
        return out
    ids = ids.contiguous()
    cfg = config or tiles.moe_config(num_experts, inter, num_tokens, x.device, x.dtype)
    fp8 = scales is not None
    if fp8 and config is None:
        cfg = fp8_tiles(cfg, x.dtype)
    gate_up_scale, down_scale = scales if fp8 else (x, x)  # unread without FP8
    block_m, block_n, block_k = cfg["BLOCK_SIZE_M"], cfg["BLOCK_SIZE_N"], cfg["BLOCK_SIZE_K"]
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    sorted_rows, block_expert, num_blocks = align_block_size(ids, num_experts, block_m)
    blocks = block_expert.numel()
    precision = _precision(x.dtype)

    h = x.new_empty(num_rows, inter)  # [T*k, I] silu(gate) * up, row t*k + j
    _gate_up_kernel[(blocks * triton.cdiv(inter, block_n),)](
        x,
        gate_up,
        h,
        sorted_rows,
        block_expert,
        num_blocks,
        num_rows,
        hidden,
        inter,
        blocks,
        x.stride(0),
        x.stride(1),
        gate_up.stride(0),
        gate_up.stride(1),
        gate_up.stride(2),
        h.stride(0),
        gate_up_scale,
        gate_up_scale.stride(0) if fp8 else 0,
        gate_up_scale.stride(1) if fp8 else 0,
        fp8_blocks(inter),
        TOP_K=top_k,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=cfg["GROUP_SIZE_M"],
        EVEN_K=hidden % block_k == 0,
        PRECISION=precision,
        FP8=fp8,
        ACT_QUANT=fp8 and act_quant,
        **launch,
    )

    # Even with k = 1 the sum kernel writes the output: rows routed to no expert get zeros.
    terms = x.new_empty(num_rows, hidden)  # [T*k, H]
    _down_kernel[(blocks * triton.cdiv(hidden, block_n),)](
        h,
        down,
        terms,
        weights.contiguous(),
        sorted_rows,
        block_expert,
        num_blocks,
        num_rows,
        inter,
        hidden,
        blocks,
        h.stride(0),
        down.stride(0),
        down.stride(1),
        down.stride(2),
        terms.stride(0),
        down_scale,
        down_scale.stride(0) if fp8 else 0,
        down_scale.stride(1) if fp8 else 0,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        GROUP_M=cfg["GROUP_SIZE_M"],
        EVEN_K=inter % block_k == 0,
        PRECISION=precision,
        FP8=fp8,
        ACT_QUANT=fp8 and act_quant,
        **launch,
    )
    block_h = min(1024, triton.next_power_of_2(hidden))
    block_t = max(1, 4096 // block_h)  # from the hidden size alone: one variant for every T
    _topk_sum_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(hidden, block_h))](
        terms,
        ids,
        out,
        num_tokens,
        num_experts,
        hidden,
        TOP_K=top_k,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        num_warps=4,
    )
    return out
