"""Compiling, at start-up, every Triton kernel variant a server can launch.

Triton compiles a kernel the first time it meets a new variant: new constexprs (tile sizes,
flags), launch options, argument dtypes, or integer arguments specialized on their value (1, a
multiple of 16). Without this, the first requests of each kind (the first prefill longer than 32
tokens, the first batch in each MoE token bucket) pay seconds of compilation. The kernels keep
their variants few and fixed: sizes that change between steps are not specialized on, the tile
configuration comes from the token bucket alone, and the runner's buffers keep pointers aligned.
So one small call per variant compiles them all:

- per layer: the residual add + RMSNorm with and without a residual, q/k norm + rotary, the
  K/V store, paged decode (and its merge) and both prefill tile heights, the router with and
  without a count of real rows;
- per MoE token bucket up to the step's token limit: the routed experts with that bucket's tile
  configuration (the variant depends on it, not on the token count, so one token runs it);
- block FP8 models: the FP8 experts the same way, and each FP8 linear in each row bucket of its
  tiles (`fp8_triton.linear_config`).

Operands are laid out as the model lays them out (q, k, v as views of one projection, int32 block
tables, int64 lengths and slots), on the real K/V cache (writing only its scratch block) and the
real expert weights, so nothing large is allocated.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from shared.kernels.gpu import (
    attention_triton,
    fp8_triton,
    fused_triton,
    moe_triton,
    prefill_triton,
    tiles,
)

log = logging.getLogger(__name__)

# Prefill chunks up to this many tokens use the short tile (`prefill_triton`).
SHORT_PREFILL = 32
# A row count in each of `fp8_triton.linear_config`'s buckets.
FP8_ROW_BUCKETS = (1, 17, 33, 65)


@dataclass(frozen=True)
class WarmupShapes:
    """What decides the kernel variants a server launches: one rank's model shapes, the cache
    and the step limits."""

    hidden_size: int
    num_heads: int  # q heads of this rank
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    top_k: int  # of the MoE layers (unused without one)
    renormalize: bool
    max_num_tokens: int  # tokens in one step
    max_blocks_per_seq: int  # the block tables' full width


def moe_tile_configs(
    num_experts: int, inter: int, max_num_tokens: int, device: torch.device, dtype: torch.dtype
) -> list[dict[str, int]]:
    """The distinct tile configurations of token counts 1..max_num_tokens: each table entry
    nearest to a count in range (those up to the limit, and the one nearest to the limit)."""
    table = tiles.table_for(num_experts, inter, tiles.device_name(device))
    counts = [m for m in table if m <= max_num_tokens] + [max_num_tokens]
    found: list[dict[str, int]] = []
    for m in counts:
        config = tiles.moe_config(num_experts, inter, m, device, dtype)
        if config not in found:
            found.append(config)
    return found


def warm_up(
    shapes: WarmupShapes,
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] one layer's cache
    v_cache: torch.Tensor,
    scratch_block: int,
    experts: tuple[torch.Tensor, ...] | None,  # one MoE layer's (gate_up, down[, their scales])
    dtype: torch.dtype,
    fp8_linears: tuple[tuple[torch.Tensor, torch.Tensor], ...] = (),  # (weight, scale) each
    act_quant: bool | None = None,  # the FP8 variant, w8a8 or w8a16; None: the backend's
) -> float:
    """Launch every variant once (their results are discarded); returns the seconds taken."""
    from shared.kernels.gpu import fp8_act_quant

    act_quant = fp8_act_quant(dtype) if act_quant is None else act_quant
    t0 = time.perf_counter()
    device = k_cache.device
    _attention(shapes, k_cache, v_cache, scratch_block, dtype)
    num_configs = _moe(shapes, experts, dtype, act_quant) if experts is not None else 0
    for weight, scale in fp8_linears:
        for rows in FP8_ROW_BUCKETS:
            if rows <= shapes.max_num_tokens:
                x = torch.zeros(rows, weight.shape[1], dtype=dtype, device=device)
                fp8_triton.fp8_linear_triton(x, weight, scale, act_quant)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    log.info(
        "Triton kernels compiled for %s in %.1f s: norms, rotary, K/V store, decode, prefill, "
        "routing, and the routed experts in %d tile configurations (token buckets up to %d)",
        dtype,
        seconds,
        num_configs,
        shapes.max_num_tokens,
    )
    return seconds


def _attention(shapes, k_cache, v_cache, scratch_block, dtype) -> None:
    device = k_cache.device
    hq, hkv, d = shapes.num_heads, shapes.num_kv_heads, shapes.head_dim
    hidden = torch.zeros(1, shapes.hidden_size, dtype=dtype, device=device)
    norm_weight = torch.ones(shapes.hidden_size, dtype=dtype, device=device)
    for residual in (None, hidden):
        fused_triton.add_rms_norm_triton(hidden, residual, norm_weight, shapes.rms_norm_eps)
    block_size = k_cache.shape[1]
    head_weight, eps = torch.ones(d, dtype=dtype, device=device), shapes.rms_norm_eps
    # q, k, v as the attention layer makes them: views of one fused projection, then q and k
    # from the fused norm + rotary (contiguous), v still a view.
    qkv = torch.zeros(1, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    cos = torch.ones(1, d, dtype=dtype, device=device)
    q, k = fused_triton.qk_norm_rope_triton(
        q.reshape(1, hq, d), k.reshape(1, hkv, d), head_weight, head_weight, eps, cos, cos
    )
    v = v.reshape(1, hkv, d)
    slots = torch.full((1,), scratch_block * block_size, dtype=torch.long, device=device)
    fused_triton.kv_store_triton(k, v, k_cache, v_cache, slots)
    table = torch.full((1,), scratch_block, dtype=torch.int32, device=device)
    prefill_triton.paged_prefill_triton(q, k, v, k_cache, v_cache, table, 0, 1.0)
    if shapes.max_num_tokens > SHORT_PREFILL:  # the long chunks' tile, on the same layouts
        n = SHORT_PREFILL + 1
        long_v = torch.zeros(n, (hq + 2 * hkv) * d, dtype=dtype, device=device)[:, -hkv * d :]
        long_q = torch.zeros(n, hq, d, dtype=dtype, device=device)
        long_k = torch.zeros(n, hkv, d, dtype=dtype, device=device)
        long_v = long_v.reshape(n, hkv, d)
        prefill_triton.paged_prefill_triton(long_q, long_k, long_v, k_cache, v_cache, table, 0, 1.0)
    # Decode at the tables' full width: the split bound the graphs use, so the merge runs too.
    width = shapes.max_blocks_per_seq
    tables = torch.full((1, width), scratch_block, dtype=torch.int32, device=device)
    lens = torch.ones(1, dtype=torch.long, device=device)
    attention_triton.paged_decode_triton(q, k_cache, v_cache, tables, lens, 1.0)


def _moe(shapes, experts, dtype, act_quant) -> int:
    """Routing with and without a count, then the experts in each bucket's tiles; returns the
    number of tile configurations."""
    gate_up, down, *scales = experts
    device = gate_up.device
    num_experts, inter = gate_up.shape[0], gate_up.shape[2] // 2
    logits = torch.zeros(1, num_experts, dtype=dtype, device=device)
    count = torch.ones(1, dtype=torch.long, device=device)
    for num_valid in (None, count):
        weights, ids = fused_triton.router_topk_triton(
            logits, shapes.top_k, shapes.renormalize, num_valid
        )
    x = torch.zeros(1, shapes.hidden_size, dtype=dtype, device=device)
    configs = moe_tile_configs(num_experts, inter, shapes.max_num_tokens, device, dtype)
    for config in configs:
        moe_triton.fused_moe_triton(
            x, gate_up, down, weights, ids, config, tuple(scales) or None, act_quant
        )
    return len(configs)
