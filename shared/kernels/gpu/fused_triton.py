"""The small ops around a decoder layer's GEMMs, one launch each instead of 6-10.

- residual add + RMSNorm: one program per token row;
- q/k RMSNorm + rotary: one program per (token, head), q and k heads in one grid;
- router softmax + top-k + renormalize: one program per token row (padding rows past a count
  read on the device get no expert);
- K/V store into the paged cache: one program per (token, kv head).

Each rounds where transformers' eager ops round (the residual sum, the normalized value, the
weight product and every rotary product and sum are rounded to the model dtype in turn), so
elementwise results are bit-exact against `shared.kernels.reference` and reductions (the mean of
squares, the softmax's sum) differ only by summation order. None reads a device value on the
host or launches a data-dependent grid: decode steps built on them capture in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _normalized(x, w, mask, eps, dim, IS_FP32: tl.constexpr):
    """RMSNorm of one row held in registers, rounded as reference.rms_norm_torch rounds."""
    xf = x.to(tl.float32)
    var = tl.sum(tl.where(mask, xf * xf, 0.0), axis=0) / dim
    rstd = 1.0 / tl.sqrt(var + eps)
    if IS_FP32:
        return xf * rstd * w.to(tl.float32)
    y = (xf * rstd).to(x.dtype)
    return (w.to(tl.float32) * y.to(tl.float32)).to(x.dtype)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    hidden,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    HAS_RESIDUAL: tl.constexpr,
    IS_FP32: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the sum transformers rounds
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = _normalized(x, w, mask, eps, hidden, IS_FP32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_triton(x, residual, weight, eps):
    """Same contract as ``shared.kernels.reference.add_rms_norm_torch``."""
    num_tokens, hidden = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    if num_tokens == 0:
        return out, res_out
    res = residual if residual is not None else x
    _add_rms_norm_kernel[(num_tokens,)](
        x,
        res,
        weight,
        out,
        res_out,
        hidden,
        eps,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        res_out.stride(0),
        HAS_RESIDUAL=residual is not None,
        IS_FP32=x.dtype == torch.float32,
        BLOCK_H=triton.next_power_of_2(hidden),
        num_warps=4 if hidden <= 2048 else 8,
    )
    return out, res_out


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr,
    k_ptr,
    qw_ptr,
    kw_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    num_q_heads,
    eps,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ct,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    HEAD_DIM: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)
    partner = (d + half) % HEAD_DIM  # rotate_half(x)[d] = -x[d + half] | x[d - half]
    sign = tl.where(d < half, -1.0, 1.0)
    if head < num_q_heads:
        src = q_ptr + token * stride_qt + head * stride_qh
        w_ptr = qw_ptr
        dst = q_out_ptr + token * stride_qot + head * stride_qoh
    else:
        kv = head - num_q_heads
        src = k_ptr + token * stride_kt + kv * stride_kh
        w_ptr = kw_ptr
        dst = k_out_ptr + token * stride_kot + kv * stride_koh
    x = tl.load(src + d)
    mask = d < HEAD_DIM
    # The partner values are normalized with the same scale: one row, one rstd
    y = _normalized(x, tl.load(w_ptr + d), mask, eps, HEAD_DIM, IS_FP32)
    xp = tl.load(src + partner)
    yp = _normalized(xp, tl.load(w_ptr + partner), mask, eps, HEAD_DIM, IS_FP32)
    cos = tl.load(cos_ptr + token * stride_ct + d).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_ct + d).to(tl.float32)
    if IS_FP32:
        out = y * cos + (sign * yp) * sin
    else:
        a = (y.to(tl.float32) * cos).to(x.dtype).to(tl.float32)
        b = ((sign * yp.to(tl.float32)) * sin).to(x.dtype).to(tl.float32)
        out = a + b
    tl.store(dst + d, out.to(dst.dtype.element_ty))


def qk_norm_rope_triton(q, k, q_weight, k_weight, eps, cos, sin):
    """Same contract as ``shared.kernels.reference.qk_norm_rope_torch``."""
    num_tokens, num_q_heads, head_dim = q.shape
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if num_tokens == 0:
        return q_out, k_out
    if head_dim & (head_dim - 1) or cos.stride(1) != 1:
        raise ValueError(f"head_dim must be a power of two, got {head_dim}")
    _qk_norm_rope_kernel[(num_tokens, num_q_heads + k.shape[1])](
        q,
        k,
        q_weight,
        k_weight,
        cos,
        sin,
        q_out,
        k_out,
        num_q_heads,
        eps,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        HEAD_DIM=head_dim,
        IS_FP32=q.dtype == torch.float32,
        num_warps=1 if head_dim <= 128 else 2,
    )
    return q_out, k_out


@triton.jit
def _router_topk_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    count_ptr,  # [1] real rows, when HAS_COUNT: the rest are padding
    num_experts,
    stride_l,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    E_PAD: tl.constexpr,
    HAS_COUNT: tl.constexpr,
):
    row = tl.program_id(0)
    slot = tl.arange(0, K_PAD)
    if HAS_COUNT:
        if row >= tl.load(count_ptr):  # padding: no expert (id E), weight 0
            tl.store(
                weights_ptr + row * TOP_K + slot, tl.zeros([K_PAD], tl.float32), mask=slot < TOP_K
            )
            tl.store(
                ids_ptr + row * TOP_K + slot,
                tl.zeros([K_PAD], tl.int64) + num_experts,
                mask=slot < TOP_K,
            )
            return
    e = tl.arange(0, E_PAD)
    logits = tl.load(logits_ptr + row * stride_l + e, mask=e < num_experts, other=-float("inf"))
    logits = logits.to(tl.float32)
    exps = tl.exp(logits - tl.max(logits, axis=0))
    probs = exps / tl.sum(exps, axis=0)
    top_weights = tl.zeros([K_PAD], dtype=tl.float32)
    top_ids = tl.zeros([K_PAD], dtype=tl.int64)
    for j in tl.static_range(TOP_K):  # the largest first, the lowest id among equals
        best = tl.max(probs, axis=0)
        chosen = tl.min(tl.where(probs == best, e, E_PAD), axis=0)
        top_weights = tl.where(slot == j, best, top_weights)
        top_ids = tl.where(slot == j, chosen.to(tl.int64), top_ids)
        probs = tl.where(e == chosen, -1.0, probs)
    if RENORMALIZE:
        top_weights = top_weights / tl.sum(top_weights, axis=0)
    tl.store(weights_ptr + row * TOP_K + slot, top_weights, mask=slot < TOP_K)
    tl.store(ids_ptr + row * TOP_K + slot, top_ids, mask=slot < TOP_K)


def router_topk_triton(logits, top_k, renormalize, num_valid_tokens=None):
    """Same contract as ``shared.kernels.reference.router_topk_torch``."""
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens:
        _router_topk_kernel[(num_tokens,)](
            logits,
            weights,
            ids,
            ids if num_valid_tokens is None else num_valid_tokens,  # unread without a count
            num_experts,
            logits.stride(0),
            TOP_K=top_k,
            K_PAD=triton.next_power_of_2(top_k),
            RENORMALIZE=renormalize,
            E_PAD=triton.next_power_of_2(num_experts),
            HAS_COUNT=num_valid_tokens is not None,
            num_warps=1 if num_experts <= 256 else 4,
        )
    return weights.to(logits.dtype), ids


@triton.jit
def _kv_store_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slots_ptr,
    block_size,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_co,
    stride_ch,
    HEAD_DIM: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    slot = tl.load(slots_ptr + token)
    dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_co + head * stride_ch
    k = tl.load(k_ptr + token * stride_kt + head * stride_kh + d)
    v = tl.load(v_ptr + token * stride_vt + head * stride_vh + d)
    tl.store(kc_ptr + dst + d, k.to(kc_ptr.dtype.element_ty))
    tl.store(vc_ptr + dst + d, v.to(vc_ptr.dtype.element_ty))


def kv_store_triton(k, v, k_cache, v_cache, slots):
    """Same contract as ``shared.kernels.reference.kv_store_torch`` (both caches share one
    layout, head_dim innermost)."""
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share one layout with head_dim innermost")
    _kv_store_kernel[(num_tokens, kv_heads)](
        k,
        v,
        k_cache,
        v_cache,
        slots,
        k_cache.shape[1],
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        *k_cache.stride()[:3],
        HEAD_DIM=head_dim,
        num_warps=1,
    )
