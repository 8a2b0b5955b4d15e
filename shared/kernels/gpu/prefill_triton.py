"""Paged attention in Triton for a prefill chunk, FlashAttention-style: one program per
(BLOCK_M query rows, q head) walks the cached context through the block table, then the chunk's
own keys causally, with the online softmax of `attention_triton`."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shared.kernels.gpu.attention_triton import (
    LOG2E,
    AttentionShapeError,
    attend,
    check_cache,
    precision_of,
    tile_n,
)


# The chunk's length and start vary with every step; specializing on them (a value of 1, a
# multiple of 16) would compile several copies of the kernel.
@triton.jit(do_not_specialize=["num_tokens", "context_start"])
def _prefill_kernel(
    q_ptr,  # [n, Hq, D]
    k_ptr,  # [n, Hkv, D] the chunk's own keys
    v_ptr,
    kc_ptr,  # [num_blocks, block_size, Hkv, D]
    vc_ptr,
    table_ptr,  # [num_blocks_of_seq] int32 or int64
    out_ptr,  # [n, Hq, D]
    num_tokens,
    context_start,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_db,
    stride_dt,
    stride_dh,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Queries at positions context_start + [0, n): first the cached context through the
    table (all of it visible), then the chunk itself under the causal mask."""
    head = tl.program_id(1)
    kv_head = head // GROUP
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_tokens
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + rows[:, None].to(tl.int64) * stride_qt + head * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], dtype=tl.float32)

    for n0 in range(0, context_start, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        live = pos < context_start
        block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=live, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        kt = tl.load(
            kc_ptr
            + (block * stride_cb + slot * stride_ct + kv_head * stride_ch)[None, :]
            + dims[:, None],
            mask=live[None, :] & dim_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            vc_ptr
            + (block * stride_db + slot * stride_dt + kv_head * stride_dh)[:, None]
            + dims[None, :],
            mask=live[:, None] & dim_ok[None, :],
            other=0.0,
        )
        m, denom, acc = attend(q, kt, v, live[None, :], m, denom, acc, qk_scale, PRECISION)

    # Chunk keys j <= i only: nothing past this block's last row.
    last = tl.minimum((tl.program_id(0) + 1) * BLOCK_M, num_tokens)
    for n0 in range(0, last, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < num_tokens
        cols64 = cols.to(tl.int64)
        kt = tl.load(
            k_ptr + (cols64 * stride_kt + kv_head * stride_kh)[None, :] + dims[:, None],
            mask=col_ok[None, :] & dim_ok[:, None],
            other=0.0,
        )
        v = tl.load(
            v_ptr + (cols64 * stride_vt + kv_head * stride_vh)[:, None] + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        visible = col_ok[None, :] & (cols[None, :] <= rows[:, None])
        m, denom, acc = attend(q, kt, v, visible, m, denom, acc, qk_scale, PRECISION)

    out = acc / denom[:, None]
    tl.store(
        out_ptr + rows[:, None].to(tl.int64) * stride_ot + head * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


def paged_prefill_triton(
    q: torch.Tensor,  # [n, Hq, D]
    k: torch.Tensor,  # [n, Hkv, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_blocks] int32 or int64 covering context_start + n
    context_start: int,
    scale: float,
) -> torch.Tensor:  # [n, Hq, D]
    """Same contract as ``shared.kernels.reference.paged_prefill_torch``. The chunk's own K/V
    come from ``k``/``v``; only the context before it is read from the cache."""
    num_heads, kv_heads = check_cache(q, k_cache, v_cache)
    num_tokens, _, head_dim = q.shape
    if k.shape != v.shape or k.shape != (num_tokens, kv_heads, head_dim):
        raise AttentionShapeError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must be "
            f"[n={num_tokens}, {kv_heads}, {head_dim}]"
        )
    if context_start < 0:
        raise AttentionShapeError(f"context_start must be >= 0, got {context_start}")
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    block_n = tile_n(head_dim, q.dtype)
    block_m = 16 if num_tokens <= 32 else block_n
    _prefill_kernel[(triton.cdiv(num_tokens, block_m), num_heads)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        block_table,
        out,
        num_tokens,
        context_start,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        out.stride(0),
        out.stride(1),
        GROUP=num_heads // kv_heads,
        HEAD_DIM=head_dim,
        DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PRECISION=precision_of(q.dtype),
        num_warps=4 if block_m == 16 else 8,
        num_stages=2,
    )
    return out
