"""Attention over a paged K/V cache: per layer ``[num_blocks, block_size, kv_heads, head_dim]``.

Two operations. ``paged_decode``: one query token per sequence, attending to its first
``context_lens[b]`` cached tokens through its block table. ``paged_prefill``: a chunk of ``n``
query tokens of one sequence at positions ``[context_start, context_start + n)``, causal, over
the cached context (whose K/V for the chunk itself is already written). GQA: query head h uses
kv head ``h // (q_heads / kv_heads)``. Softmax in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def paged_decode_torch(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W] int64; entries past a context point anywhere valid
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
    block_table: torch.Tensor,  # [num_blocks] int64 covering context_start + n
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
