"""C++ CPU kernels: routed experts (float or block FP8 weights; for GEMM-sized batches the sum
of the grouped GEMMs' rows), FP8 linears, paged decode
attention, residual add + RMSNorm and q/k RMSNorm + rotary (``torch.ops.splitvl``); bf16 GEMMs
at bucketed shapes.

Compiled on first use by `available()` (never at import), once per machine, into a cache
keyed by sources, flags, compiler, torch and CPU (see `shared.kernels.cpu.build`);
``python -m shared.kernels.cpu`` builds it ahead of time. Both kernels parallelize with ATen's
intra-op pool, so ``torch.set_num_threads`` sets their thread count, and give the same results
for any thread count. The wrappers keep the references' signatures and fall back to them for
what the kernels do not cover (other dtypes or devices, inputs that need autograd).
"""

from __future__ import annotations

import functools
import logging
import threading

import torch

from shared.kernels.cpu import onednn
from shared.kernels.cpu.onednn import linear as linear  # the backend's `linear`
from shared.kernels.reference import (
    add_rms_norm_torch,
    fp8_linear_torch,
    fused_moe_fp8_torch,
    fused_moe_grouped,
    fused_moe_torch,
    moe_combine_torch,
    paged_decode_torch,
    paged_prefill_torch,
    qk_norm_rope_torch,
)

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16)
# Mean rows per expert from which the reference's grouped GEMMs (oneDNN's packed panels) beat
# the kernel's register tiles, by what the CPU has. Measured with `bench.kernels_cpu` on three
# expert shapes (16x512x384 top-4, 32x1024x256 top-8, 24x576x200 top-6), one thread: on an AVX2
# Zen 3 fp32 crosses at 64-96 rows; with AVX512F at 16-24; bf16 with AVX512-BF16 / AMX dot
# products at 8-16 (the GEMM 2-4x faster from 64 rows). Without native bf16 the bf16 reference
# is 10-30x slower: the kernel keeps every size.
GEMM_ROWS_FP32 = {"avx512f": 24, None: 96}
GEMM_ROWS_BF16 = {"avx512_bf16": 12, "amx_bf16": 12, None: None}
# AMD with AVX-512 (Zen 4 and later; 2 cores, the same three shapes, both paths timed at 8-512
# rows per expert): torch's fp32 GEMMs run far slower there than on Intel, the kernel wins up to
# 150-200 rows on the wide shape and up to 512 on the others (128 rows: 15.5 vs 24.2 ms,
# 15.3 vs 22.5, 46.0 vs 46.9); bf16 crosses at 16-24 rows.
GEMM_ROWS_AMD_AVX512 = {torch.float32: 160, torch.bfloat16: 20}
# Rows of x from which an fp8 linear dequantizes its weight (in C++) for oneDNN's GEMM: the
# kernel's fp32 FMAs are faster below, the GEMM's bf16 dot products above (crossing at 24-32
# rows at 1024 x 512 and 2048 x 4096, bf16, one thread, AVX512-BF16 + AMX).
FP8_GEMM_ROWS = 32
_lock = threading.Lock()
_loaded: bool | None = None
_error: str | None = None


def _load() -> bool:
    global _error
    try:
        from shared.kernels.cpu.build import library

        path, _ = library()
        if not hasattr(torch.ops.splitvl, "fused_moe"):
            torch.ops.load_library(str(path))
        return True
    except Exception as exc:  # a missing or broken toolchain must never stop the engine
        _error = f"{type(exc).__name__}: {exc}"
        log.warning("C++ CPU kernels unavailable, using the PyTorch references: %s", _error)
        return False


def available() -> bool:
    """Whether the extension is built and loaded (builds it on the first call)."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _load()
    return _loaded


@functools.cache
def gemm_rows(dtype: torch.dtype) -> int | None:
    """Mean rows per expert from which `fused_moe` hands `dtype` (x and weights alike) to the
    reference's GEMMs on this CPU; None: never. Fixed per machine, so results are too."""
    from shared.kernels.cpu.build import cpu_features, cpu_vendor

    table = GEMM_ROWS_BF16 if dtype == torch.bfloat16 else GEMM_ROWS_FP32
    features = set(cpu_features())
    rows = next((table[f] for f in table if f is not None and f in features), table[None])
    if cpu_vendor() == "AuthenticAMD" and "avx512f" in features:
        rows = GEMM_ROWS_AMD_AVX512.get(dtype, rows) if rows is not None else None
    log.info("CPU fused MoE: %s from %s rows per expert take oneDNN's GEMMs", dtype, rows)
    return rows


def build_error() -> str | None:
    """Why `available()` returned False, or None."""
    return _error


def _reference_needed(*tensors: torch.Tensor) -> bool:
    if not available():
        return True
    grad = torch.is_grad_enabled()
    return any(t.device.type != "cpu" or (grad and t.requires_grad) for t in tensors)


def fused_moe(
    x: torch.Tensor,  # [T, H]
    gate_up: torch.Tensor,  # [E, H, 2I]
    down: torch.Tensor,  # [E, I, H]
    weights: torch.Tensor,  # [T, k], x.dtype
    ids: torch.Tensor,  # [T, k] int64
) -> torch.Tensor:  # [T, H]
    """See shared.kernels.reference.fused_moe_torch; float32 or bfloat16 throughout, or float32
    activations with bfloat16 expert weights (widened in registers, never copied).

    Many rows per expert (prefill) go to the reference, whose grouped GEMMs (oneDNN, packed
    panels; at bucketed row counts, `onednn.grouped_mm`) are faster there, from
    `gemm_rows(dtype)`, which depends on the CPU's ISA; mixed
    weights always take the kernel (the reference would widen every expert's weights per call)."""
    mixed = x.dtype == torch.float32 and gate_up.dtype == torch.bfloat16
    ok = x.dtype in _DTYPES and weights.dtype == x.dtype and gate_up.dtype == down.dtype
    ok = ok and (gate_up.dtype == x.dtype or mixed)
    rows = None if mixed or not ok else gemm_rows(x.dtype)
    gemm_bound = rows is not None and ids.numel() >= rows * gate_up.shape[0]
    if not ok or _reference_needed(x, gate_up, down, weights):
        return fused_moe_torch(x, gate_up, down, weights, ids)
    if gemm_bound:
        return fused_moe_grouped(x, gate_up, down, weights, ids, onednn.grouped_mm, moe_combine)
    return torch.ops.splitvl.fused_moe(x, gate_up, down, weights, ids)


def moe_combine(
    h: torch.Tensor,  # [T*k, H] sorted by expert
    order: torch.Tensor,  # [T*k] int64
    weights: torch.Tensor,  # [T, k]
    ids: torch.Tensor,  # [T, k] int64
    num_experts: int,
) -> torch.Tensor:  # [T, H]
    """See shared.kernels.reference.moe_combine_torch: one pass over h, bit for bit the same."""
    ok = h.dtype in _DTYPES and weights.dtype == h.dtype and ids.dtype == torch.int64
    if not ok or _reference_needed(h, weights, ids):
        return moe_combine_torch(h, order, weights, ids, num_experts)
    return torch.ops.splitvl.moe_combine(h, order, weights, ids, num_experts)


def fused_moe_fp8(
    x: torch.Tensor,  # [T, H]
    gate_up: torch.Tensor,  # [E, H, 2I] e4m3
    down: torch.Tensor,  # [E, I, H] e4m3
    gate_up_scale: torch.Tensor,  # [E, ceil(H/128), 2 ceil(I/128)] fp32
    down_scale: torch.Tensor,  # [E, ceil(I/128), ceil(H/128)] fp32
    weights: torch.Tensor,  # [T, k], x.dtype
    ids: torch.Tensor,  # [T, k] int64
) -> torch.Tensor:  # [T, H]
    """See shared.kernels.reference.fused_moe_fp8_torch: weight-only (w8a16 / w8a32), the
    e4m3 weights widened in registers and scaled per block, x float32 or bfloat16. Every size
    takes the kernel, as bf16 weights do: the reference would dequantize every expert per call."""
    ok = x.dtype in _DTYPES and weights.dtype == x.dtype
    ok = ok and gate_up_scale.dtype == down_scale.dtype == torch.float32
    tensors = (x, gate_up, down, gate_up_scale, down_scale, weights)
    if not ok or _reference_needed(*tensors):
        return fused_moe_fp8_torch(x, gate_up, down, gate_up_scale, down_scale, weights, ids)
    return torch.ops.splitvl.fused_moe_fp8(
        x, gate_up, down, gate_up_scale, down_scale, weights, ids
    )


def fp8_linear(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K] e4m3
    scale: torch.Tensor,  # [ceil(N/128), ceil(K/128)] fp32
) -> torch.Tensor:  # [M, N]
    """See shared.kernels.reference.fp8_linear_torch: weight-only, x float32 or bfloat16. From
    `FP8_GEMM_ROWS` rows (prefill) the weight is dequantized (in C++) to x's dtype for oneDNN's
    GEMM, whose packed panels (bf16 dot products, AMX) beat the kernel's fp32 FMAs there."""
    if x.dim() != 2:
        return fp8_linear(x.reshape(-1, x.shape[-1]), weight, scale).view(*x.shape[:-1], -1)
    ok = x.dtype in _DTYPES and scale.dtype == torch.float32
    if not ok or _reference_needed(x, weight, scale):
        return fp8_linear_torch(x, weight, scale)
    if x.shape[0] >= FP8_GEMM_ROWS:
        dense = torch.ops.splitvl.fp8_dequantize(weight, scale, x.dtype)
        return torch.nn.functional.linear(x, dense)
    return torch.ops.splitvl.fp8_linear(x, weight, scale)


def paged_prefill(
    q: torch.Tensor,  # [n, Hq, D]
    k: torch.Tensor,  # [n, Hkv, D], the chunk's own keys
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_blocks] covering context_start + n
    context_start: int,
    scale: float,
) -> torch.Tensor:  # [n, Hq, D]
    """See shared.kernels.reference.paged_prefill_torch. After cached tokens, the chunk attends
    to them and to itself in two unmasked passes of torch's CPU flash kernel (the cached keys
    with no mask, the chunk's own causally), merged by the passes' log-sum-exps. The reference's
    one pass with a lower-right causal mask takes torch's math path: 4-12x slower at contexts
    of a few thousand tokens. Without cached tokens only the causal pass runs."""
    ok = q.dtype in _DTYPES and k_cache.dtype == q.dtype == k.dtype and q.device.type == "cpu"
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not ok or grad:
        return paged_prefill_torch(q, k, v, k_cache, v_cache, block_table, context_start, scale)
    n, num_heads, dim = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # The chunk's own keys, causally (square: flash's upper-left mask is the right one). Its
    # kv heads are repeated per query head: flash has no GQA, and the reference's enable_gqa
    # sends SDPA to its math path (a materialized causal mask, 3-5x slower).
    own_k = k.transpose(0, 1).repeat_interleave(group, 0)[None]
    own_v = v.transpose(0, 1).repeat_interleave(group, 0)[None]
    own, own_lse = flash(q.transpose(0, 1)[None], own_k, own_v, 0.0, True, scale=scale)
    if context_start == 0:
        return own[0].transpose(0, 1)
    # Cached keys: no mask, so each kv head's `group` query heads go as one longer query
    # sequence against that head's keys, which are never copied per query head.
    cached_k = k_cache[block_table].flatten(0, 1)[:context_start].transpose(0, 1)[None]
    cached_v = v_cache[block_table].flatten(0, 1)[:context_start].transpose(0, 1)[None]
    grouped_q = q.view(n, num_kv, group, dim).permute(1, 2, 0, 3).reshape(1, num_kv, -1, dim)
    past, past_lse = flash(grouped_q, cached_k, cached_v, 0.0, False, scale=scale)
    past = past.reshape(1, num_heads, n, dim)
    past_lse = past_lse.reshape(1, num_heads, n)
    top = torch.maximum(past_lse, own_lse)
    w_past = torch.exp(past_lse - top).unsqueeze(-1)
    w_own = torch.exp(own_lse - top).unsqueeze(-1)
    out = (past.float() * w_past + own.float() * w_own) / (w_past + w_own)
    return out[0].transpose(0, 1).to(q.dtype)


def add_rms_norm(
    x: torch.Tensor,  # [..., H]
    residual: torch.Tensor | None,
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See shared.kernels.reference.add_rms_norm_torch: one pass per row in the reference's
    rounding order (bf16: bit-exact but for the sum of squares' order), x, residual and weight
    of one dtype, float32 or bfloat16."""
    tensors = (x, weight) if residual is None else (x, residual, weight)
    ok = x.dtype in _DTYPES and all(t.dtype == x.dtype for t in tensors)
    if not ok or _reference_needed(*tensors):
        return add_rms_norm_torch(x, residual, weight, eps)
    out, h = torch.ops.splitvl.add_rms_norm(x, residual, weight, float(eps))
    return out, h


def qk_norm_rope(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    q_weight: torch.Tensor,  # [D]
    k_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,  # [T, D] in q's dtype
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See shared.kernels.reference.qk_norm_rope_torch: one pass per token in the reference's
    rounding order, every tensor of one dtype (float32 or bfloat16), D even; q and k may be
    column slices of the fused qkv projection (no copy)."""
    tensors = (q, k, q_weight, k_weight, cos, sin)
    ok = q.dtype in _DTYPES and all(t.dtype == q.dtype for t in tensors) and q.shape[-1] % 2 == 0
    if not ok or _reference_needed(*tensors):
        return qk_norm_rope_torch(q, k, q_weight, k_weight, eps, cos, sin)
    q_out, k_out = torch.ops.splitvl.qk_norm_rope(q, k, q_weight, k_weight, float(eps), cos, sin)
    return q_out, k_out


def paged_decode(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W] int32 or int64
    context_lens: torch.Tensor,  # [B] int64
    scale: float,
) -> torch.Tensor:  # [B, Hq, D]
    """See shared.kernels.reference.paged_decode_torch; q and the cache float32 or bfloat16."""
    ok = q.dtype in _DTYPES and k_cache.dtype in _DTYPES and v_cache.dtype == k_cache.dtype
    if not ok or _reference_needed(q, k_cache, v_cache):
        return paged_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale)
    return torch.ops.splitvl.paged_decode(
        q, k_cache, v_cache, block_tables, context_lens, float(scale)
    )
