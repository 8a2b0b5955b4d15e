"""The PyTorch references of every kernel: the implementations all others are tested against.

Paged attention over a K/V cache of ``[num_blocks, block_size, kv_heads, head_dim]`` per layer.
``paged_decode``: one query token per sequence, attending to its first ``context_lens[b]`` cached
tokens through its block table. ``paged_prefill``: a chunk of ``n`` query tokens of one sequence
at positions ``[context_start, context_start + n)``, causal, over the cached context (whose K/V
for the chunk itself is already written). GQA: query head h uses kv head
``h // (q_heads / kv_heads)``. Softmax in fp32.

Routed experts: out[t] = sum_j w[t, j] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = ids[t, j].
Weights stay in the fused hub layout: ``gate_up [E, H, 2I]`` (gate is the first I columns) and
``down [E, I, H]``. The sum over a token's experts runs in top-k order, so every
implementation adds the same terms in the same order. The id ``E`` routes a row to no expert:
its term is zero and no expert's weights are read for it. The router gives it to the padding
rows of a step (rows at or past a count of real tokens, kept on the device).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def paged_decode_torch(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W] int32 or int64; entries past a context: any valid id
    context_lens: torch.Tensor,  # [B] int64, >= 1
    scale: float,
) -> torch.Tensor:  # [B, Hq, D]
    """The reference: gather each row's W blocks, one masked SDPA for the batch."""
    batch, num_heads, dim = q.shape
    num_kv = k_cache.shape[2]
    width = block_tables.shape[1] * k_cache.shape[1]
    keys = k_cache[block_tables].view(batch, width, num_kv, dim).transpose(1, 2)
    values = v_cache[block_tables].view(batch, width, num_kv, dim).transpose(1, 2)
    positions = torch.arange(width, device=q.device)
    mask = (positions < context_lens[:, None])[:, None, None, :]  # [B, 1, 1, width]
    # GQA without copying K/V: the q heads sharing a kv head become that head's queries.
    grouped = q.view(batch, num_kv, num_heads // num_kv, dim)
    out = F.scaled_dot_product_attention(
        grouped, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=scale
    )
    return out.reshape(batch, num_heads, dim)


def paged_prefill_torch(
    q: torch.Tensor,  # [n, Hq, D]
    k: torch.Tensor,  # [n, Hkv, D], the chunk's own keys
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_blocks] int32 or int64 covering context_start + n
    context_start: int,
    scale: float,
) -> torch.Tensor:  # [n, Hq, D]
    """The reference: causal SDPA over the chunk, or over cache + chunk (lower-right aligned
    causal bias, no materialized [n, context] mask) when earlier tokens are cached."""
    num_tokens = q.shape[0]
    if context_start == 0:
        keys, values, bias = k, v, None
    else:
        num_context = context_start + num_tokens
        keys = k_cache[block_table].flatten(0, 1)[:num_context]
        values = v_cache[block_table].flatten(0, 1)[:num_context]
        bias = causal_lower_right(num_tokens, num_context)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        keys.transpose(0, 1).to(q.dtype),
        values.transpose(0, 1).to(q.dtype),
        attn_mask=bias,
        is_causal=bias is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)


_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in tensors)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not (_HAS_GROUPED_MM and _aligned(x, w)):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16
    return x.dtype in (torch.float32, torch.bfloat16)


def expert_offsets(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Cumulative row counts per expert, int32 ``[E]``, computed on the device (no host sync:
    ``bincount`` would read the maximum back to size its output). Rows of id E (no expert)
    fall in a last bin, left out."""
    flat = ids.reshape(-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return counts[:num_experts].cumsum(0, dtype=torch.int32)


def _grouped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x ``[n, K]`` sorted by expert, w ``[E, K, N]`` -> ``[n, N]``."""
    if _grouped_mm_ok(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    # One matmul per expert that has rows; reads the offsets on the host (eager only).
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[e], out=out[start:end])
        start = end
    return out


def fused_moe_torch(
    x: torch.Tensor,  # [T, H]
    gate_up: torch.Tensor,  # [E, H, 2I]
    down: torch.Tensor,  # [E, I, H]
    weights: torch.Tensor,  # [T, k] routing weights, x.dtype
    ids: torch.Tensor,  # [T, k] int64 expert ids, E: no expert
) -> torch.Tensor:  # [T, H]
    """The reference: rows sorted by expert, grouped matmuls, then un-sorted and summed. Rows
    of id E sort last, past every expert's rows, where the grouped matmuls leave them
    undefined: their terms are replaced by zeros.

    Expert weights of another dtype than x (bf16 weights kept for fp32 compute on CPUs without
    bf16 arithmetic) are widened to x's dtype first."""
    return fused_moe_grouped(x, gate_up, down, weights, ids, _grouped)


def moe_combine_torch(
    h: torch.Tensor,  # [T*k, H] the experts' output rows, sorted by expert
    order: torch.Tensor,  # [T*k] int64: sorted row p is flat row order[p] (= t*k + j)
    weights: torch.Tensor,  # [T, k]
    ids: torch.Tensor,  # [T, k] int64, num_experts: no expert
    num_experts: int,
) -> torch.Tensor:  # [T, H]
    """out[t] = sum over j, in top-k order, of weights[t, j] * (row (t, j) of h), a zero term
    where ids[t, j] is no expert; each product and sum rounded to h's dtype."""
    num_tokens, top_k = ids.shape
    unsorted = torch.empty_like(h).index_copy_(0, order, h)  # row j of token t at t*k + j
    terms = unsorted.view(num_tokens, top_k, -1) * weights.unsqueeze(-1)
    terms = torch.where((ids < num_experts).unsqueeze(-1), terms, 0)
    out = terms[:, 0]
    for j in range(1, top_k):  # top-k order, explicitly
        out = out + terms[:, j]
    return out


def fused_moe_grouped(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    grouped: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    combine: Callable[..., torch.Tensor] = moe_combine_torch,
) -> torch.Tensor:
    """`fused_moe_torch` with `grouped(x [n, K], w [E, K, N], offs int32 [E]) -> [n, N]` in
    place of its grouped matmul (a backend's own, with the same contract), and `combine` (the
    contract of `moe_combine_torch`) in place of its un-sorting weighted sum."""
    gate_up, down = gate_up.to(x.dtype), down.to(x.dtype)
    order = torch.argsort(ids.reshape(-1), stable=True)
    offs = expert_offsets(ids, gate_up.shape[0])
    h = grouped(x.index_select(0, order // ids.shape[1]), gate_up, offs)  # [T*k, 2I]
    gate, up = h.chunk(2, dim=-1)
    h = grouped((F.silu(gate) * up).contiguous(), down, offs)  # [T*k, H]
    return combine(h, order, weights, ids, gate_up.shape[0])


# -- the small ops around the GEMMs: what the fused kernels replace ---------------------------


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm over the last axis: normalize in fp32, cast back to x's dtype, then
    scale in that dtype (the order transformers keeps, which decides bf16's rounding)."""
    if x.dtype == torch.float32 == weight.dtype:
        return F.rms_norm(x, weight.shape, weight, eps)  # the same arithmetic in one op
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_torch(
    x: torch.Tensor,  # [T, H]
    residual: torch.Tensor | None,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, the new residual)
    """RMSNorm(x + residual) and x + residual (rounded to x's dtype first, as transformers adds
    the residual before the next norm); without a residual, RMSNorm(x) and x."""
    h = x if residual is None else x + residual
    return rms_norm_torch(h, weight, eps), h


def qk_norm_rope_torch(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    q_weight: torch.Tensor,  # [D]
    k_weight: torch.Tensor,  # [D]
    eps: float,
    cos: torch.Tensor,  # [T, D] in q's dtype
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k, then rotary: x * cos + rotate_half(x) * sin in q's dtype."""

    def rope(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]

    return rope(rms_norm_torch(q, q_weight, eps)), rope(rms_norm_torch(k, k_weight, eps))


def router_topk_torch(
    logits: torch.Tensor,  # [T, E] in the model dtype
    top_k: int,
    renormalize: bool,
    num_valid_tokens: torch.Tensor | None = None,  # [1] int64 on logits' device
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, k] in logits' dtype, ids [T, k] int64
    """Softmax in fp32, the top k, optionally renormalized over them, cast back. Rows at or
    past ``num_valid_tokens`` (padding) get id E (no expert) and weight 0."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(logits.dtype)
    if num_valid_tokens is not None:
        padding = (torch.arange(logits.shape[0], device=logits.device) >= num_valid_tokens)[:, None]
        weights = weights.masked_fill(padding, 0)
        ids = ids.masked_fill(padding, logits.shape[1])
    return weights, ids


def kv_store_torch(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [T] flat slot of each token
) -> None:
    """Write each token's K/V at its flat slot of the paged cache."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


# -- block FP8 (transformers' fine-grained FP8: e4m3 weights, one scale per 128x128 block) ---

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
FP8_BLOCK = 128  # weight_block_size [128, 128]; the activation groups of w8a8 too


def fp8_blocks(size: int) -> int:
    """Scale entries along a dimension of `size`: the last block may be partial."""
    return -(-size // FP8_BLOCK)


def fp8_block_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., R, C]`` -> (e4m3 ``[..., R, C]``, fp32 ``weight_scale_inv [..., ceil(R/128),
    ceil(C/128)]``): each 128x128 block (partial at the edges) divided by its absolute maximum
    over 448. ``weight_scale_inv`` multiplies to dequantize (DeepSeek's and vLLM's name); an
    all-zero block gets scale 1."""
    *lead, rows, cols = w.shape
    nr, nc = fp8_blocks(rows), fp8_blocks(cols)
    padded = w.new_zeros(*lead, nr * FP8_BLOCK, nc * FP8_BLOCK, dtype=torch.float32)
    padded[..., :rows, :cols] = w
    blocks = padded.view(*lead, nr, FP8_BLOCK, nc, FP8_BLOCK)
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(*lead, nr * FP8_BLOCK, nc * FP8_BLOCK)[..., :rows, :cols].contiguous()
    return q, scale


def fp8_block_dequantize(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """e4m3 ``[..., R, C]`` times its block scales ``[..., ceil(R/128), ceil(C/128)]``."""
    rows, cols = q.shape[-2:]
    full = scale.float().repeat_interleave(FP8_BLOCK, -2).repeat_interleave(FP8_BLOCK, -1)
    return (q.float() * full[..., :rows, :cols]).to(dtype)


def fp8_gate_up_dequantize(
    gate_up: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fused ``gate_up [E, H, 2I]`` whose gate and up halves are blocked separately: scale
    ``[E, ceil(H/128), 2 ceil(I/128)]``, gate's column blocks first."""
    inter, half = gate_up.shape[-1] // 2, scale.shape[-1] // 2
    gate = fp8_block_dequantize(gate_up[..., :inter], scale[..., :half], dtype)
    up = fp8_block_dequantize(gate_up[..., inter:], scale[..., half:], dtype)
    return torch.cat([gate, up], dim=-1)


def fp8_act_quantize(x: torch.Tensor) -> torch.Tensor:
    """w8a8's dynamic activation quantization, as the kernels do it, returned dequantized:
    per token and group of 128 columns, e4m3 with scale max|x| / 448."""
    rows, cols = x.shape
    groups = fp8_blocks(cols)
    padded = x.new_zeros(rows, groups * FP8_BLOCK, dtype=torch.float32)
    padded[:, :cols] = x
    blocks = padded.view(rows, groups, FP8_BLOCK)
    scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return (q.float() * scale).view(rows, -1)[:, :cols]


def fp8_linear_torch(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K] e4m3
    scale: torch.Tensor,  # [ceil(N/128), ceil(K/128)]
    act_quant: bool = False,
) -> torch.Tensor:  # [M, N] in x's dtype
    """The reference: dequantize the weight to fp32 (exact), fp32 matmul, cast to x's dtype.
    ``act_quant``: quantize x per token and 128-column group first (w8a8)."""
    a = fp8_act_quantize(x) if act_quant else x.float()
    return F.linear(a, fp8_block_dequantize(weight, scale)).to(x.dtype)


def fused_moe_fp8_torch(
    x: torch.Tensor,  # [T, H]
    gate_up: torch.Tensor,  # [E, H, 2I] e4m3
    down: torch.Tensor,  # [E, I, H] e4m3
    gate_up_scale: torch.Tensor,  # [E, ceil(H/128), 2 ceil(I/128)]
    down_scale: torch.Tensor,  # [E, ceil(I/128), ceil(H/128)]
    weights: torch.Tensor,  # [T, k]
    ids: torch.Tensor,  # [T, k]
    act_quant: bool = False,
) -> torch.Tensor:  # [T, H]
    """The reference: `fused_moe_torch` in fp32 on the dequantized experts (fp32 products of
    e4m3 values and their scales are exact), cast to x's dtype. ``act_quant``: each GEMM's
    input quantized per row and 128-column group first (w8a8)."""
    gu = fp8_gate_up_dequantize(gate_up, gate_up_scale)
    dn = fp8_block_dequantize(down, down_scale)
    if not act_quant:
        return fused_moe_torch(x.float(), gu, dn, weights.float(), ids).to(x.dtype)
    a = fp8_act_quantize(x)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for j in range(ids.shape[1]):  # top-k order, as fused_moe_torch sums
        term = torch.zeros_like(out)
        for e in ids[:, j].unique().tolist():
            if e >= gu.shape[0]:
                continue
            rows = (ids[:, j] == e).nonzero().squeeze(1)
            gate, up = (a[rows] @ gu[e]).chunk(2, dim=-1)
            h = fp8_act_quantize((F.silu(gate) * up).to(x.dtype))  # stored in x's dtype
            term[rows] = (h @ dn[e]) * weights[rows, j, None].float()
        out = out + term
    return out.to(x.dtype)
