"""Paged attention in Triton: split-KV decode (and, in `prefill_triton`, a FlashAttention-style
prefill chunk built on the same tile step).

Both read the cache ``[num_blocks, block_size, kv_heads, head_dim]`` through block tables
inside the kernel: a tile of BLOCK_N token positions loads its block ids from the table, then
gathers K/V rows; positions at or past a sequence's context are masked and never loaded, so the
table entries there (pointing at the scratch block) are never dereferenced. Softmax is online, in
fp32, in base 2 (``exp2`` with the scale folded into ``log2(e) * scale``).

Decode (flash-decoding): one program per (sequence, kv head, split) holds all the q heads of
that kv head, so each K/V tile is read once for the whole group. The grid's split count is a
bound from static shapes (the block-table width bounds the context), so a captured graph
replays the same grid; each program sizes its share from its own row's context length, read on
the device: a row uses as many splits as it has MIN_PARTITION-token pieces (at most the bound),
all of about equal length, and the programs past them exit at once. A row with one split writes
its output directly; a second kernel merges the others' per-split results by their
log-sum-exp, looping over the row's own split count. The split count is a runtime argument, so
every grid shares one compiled kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def attend(q, kt, v, visible, m, denom, acc, qk_scale, PRECISION: tl.constexpr):
    """One online-softmax step over a K/V tile: q [M, D], kt [D, N], v [N, D], visible [M, N]
    or [1, N]; returns the updated running max, denominator and unnormalized output."""
    s = tl.dot(q, kt.to(q.dtype), input_precision=PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m - m_new)
    denom = denom * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
    return m_new, denom, acc


# Each split covers at least this many tokens: below it, a split's fixed cost (loading q,
# the merge) outweighs the parallelism it adds.
MIN_PARTITION = 128


@triton.jit
def _partition(ctx, max_splits, MIN_PART: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens per split of a row of `ctx` tokens: one split per MIN_PART tokens (at most
    `max_splits`), of equal length rounded up to whole tiles. The row then uses
    ``cdiv(ctx, partition)`` splits, each with at least one token."""
    wanted = tl.minimum(tl.cdiv(ctx, MIN_PART), max_splits)
    return tl.cdiv(tl.cdiv(ctx, wanted), BLOCK_N) * BLOCK_N


# The split bound and the table's row stride (the step's table width in eager steps) vary
# between calls; specializing on them (a value of 1, a multiple of 16) would compile several
# copies of one kernel.
@triton.jit(do_not_specialize=["max_splits", "stride_tb"])
def _decode_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [num_blocks, block_size, Hkv, D]
    v_ptr,
    table_ptr,  # [B, W] int32 or int64
    ctx_ptr,  # [B]
    out_ptr,  # [B, Hq, D]: rows that use one split
    part_ptr,  # [B, Hq, max_splits, D] fp32: the others' per-split outputs
    lse_ptr,  # [B, Hq, max_splits] fp32, base 2
    qk_scale,  # scale * log2(e)
    max_splits,  # the grid's third dimension
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_tb,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_PART: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)
    partition = _partition(ctx, max_splits, MIN_PART, BLOCK_N)
    start = split * partition
    if start >= ctx:
        return
    end = tl.minimum(start + partition, ctx)

    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=head_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        live = pos < end
        block = tl.load(table_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=live, other=0)
        block = block.to(tl.int64)  # from an int32 table, block * stride could pass 2**31
        slot = pos % BLOCK_SIZE
        k_off = block * stride_kb + slot * stride_kt + kv_head * stride_kh
        v_off = block * stride_vb + slot * stride_vt + kv_head * stride_vh
        kt = tl.load(
            k_ptr + k_off[None, :] + dims[:, None], mask=live[None, :] & dim_ok[:, None], other=0.0
        )  # [DIM_PAD, BLOCK_N]
        v = tl.load(
            v_ptr + v_off[:, None] + dims[None, :], mask=live[:, None] & dim_ok[None, :], other=0.0
        )  # [BLOCK_N, DIM_PAD]
        m, denom, acc = attend(q, kt, v, live[None, :], m, denom, acc, qk_scale, PRECISION)

    out = acc / denom[:, None]
    store_ok = head_ok[:, None] & dim_ok[None, :]
    if partition >= ctx:  # the row's only split: its result is the output
        tl.store(
            out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=store_ok,
        )
    else:
        slot = (seq * (tl.num_programs(1) * GROUP) + heads) * max_splits + split
        tl.store(part_ptr + slot[:, None] * HEAD_DIM + dims[None, :], out, mask=store_ok)
        tl.store(lse_ptr + slot, m + tl.log2(denom), mask=head_ok)


@triton.jit(do_not_specialize=["max_splits"])
def _decode_merge_kernel(
    part_ptr,  # [B, Hq, max_splits, D] fp32
    lse_ptr,  # [B, Hq, max_splits] fp32, base 2
    ctx_ptr,
    out_ptr,  # [B, Hq, D]
    max_splits,
    num_heads,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_PART: tl.constexpr,
):
    """Log-sum-exp weighted sum of the row's splits, in split order (rows of one split were
    written by the decode kernel)."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    ctx = tl.load(ctx_ptr + seq).to(tl.int32)
    used = tl.cdiv(ctx, _partition(ctx, max_splits, MIN_PART, BLOCK_N))
    if used == 1:
        return
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    row = seq * num_heads + head
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([DIM_PAD], dtype=tl.float32)
    for split in range(0, used):
        lse = tl.load(lse_ptr + row * max_splits + split + tl.arange(0, 1))
        part = tl.load(part_ptr + (row * max_splits + split) * HEAD_DIM + dims, mask=dim_ok)
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        total = total * alpha + w
        acc = acc * alpha + w * part
        m = m_new
    tl.store(
        out_ptr + seq * stride_ob + head * stride_oh + dims,
        (acc / total).to(out_ptr.dtype.element_ty),
        mask=dim_ok,
    )


def precision_of(dtype: torch.dtype) -> str:
    # fp32 would run as tf32 on tensor cores by default; "ieee" keeps the fp32 path exact.
    return "ieee" if dtype == torch.float32 else "tf32"


class AttentionShapeError(ValueError):
    """The attention operands do not fit together."""


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs keep tests fast


# Aim for this many programs per SM when contexts are full, so the last wave is short.
PROGRAMS_PER_SM = 4
MAX_SPLITS = 128


def num_splits(batch: int, kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per sequence from static shapes only: enough programs to fill the GPU when every
    context is at its maximum, and no split shorter than MIN_PARTITION tokens."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * _num_sms(device), batch * kv_heads)
    return max(1, min(wanted, triton.cdiv(max_context, MIN_PARTITION), MAX_SPLITS))


def tile_n(head_dim: int, dtype: torch.dtype) -> int:
    """K/V positions per tile: 64 for 2-byte heads up to 128 wide; 16 for fp32, whose exact
    (non-tensor-core) dots spill registers at 32 and above (`bench.kernels_triton
    --compile-only` compiles both dtypes and fails on spills); 32 for wider bf16 heads."""
    if dtype.itemsize > 2:
        return 16
    return 64 if head_dim <= 128 else 32


def check_cache(q, k_cache, v_cache) -> tuple[int, int]:
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise AttentionShapeError(
            f"k_cache {tuple(k_cache.shape)} and v_cache "
            f"{tuple(v_cache.shape)} must match, [blocks, block_size, "
            "kv_heads, head_dim]"
        )
    num_heads, kv_heads = q.shape[-2], k_cache.shape[2]
    if num_heads % kv_heads or q.shape[-1] != k_cache.shape[3]:
        raise AttentionShapeError(
            f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}"
        )
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise AttentionShapeError("head_dim must be the innermost, contiguous dimension")
    return num_heads, kv_heads


def split_buffers(
    batch: int, num_heads: int, splits: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split outputs ``[B, Hq, splits, D]`` and log-sum-exps ``[B, Hq, splits]``, fp32.
    With one split at most every row writes its output directly: one-element stand-ins keep
    the kernel's signature, hence its compiled variant, the same."""
    shape = (batch, num_heads, splits) if splits > 1 else (1,)
    part = torch.empty(*shape, head_dim, dtype=torch.float32, device=device)
    return part, torch.empty(shape, dtype=torch.float32, device=device)


def paged_decode_triton(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, W] int32 or int64
    context_lens: torch.Tensor,  # [B], >= 1
    scale: float,
    splits: int | None = None,
) -> torch.Tensor:  # [B, Hq, D]
    """Same contract as ``shared.kernels.reference.paged_decode_torch``; ``splits`` overrides
    the bound on splits per row (tests)."""
    num_heads, kv_heads = check_cache(q, k_cache, v_cache)
    batch, _, head_dim = q.shape
    block_size = k_cache.shape[1]
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    group = num_heads // kv_heads
    if splits is None:
        splits = num_splits(batch, kv_heads, block_tables.shape[1] * block_size, q.device)
    block_n = tile_n(head_dim, q.dtype)
    dim_pad = triton.next_power_of_2(head_dim)
    part, lse = split_buffers(batch, num_heads, splits, head_dim, q.device)
    _decode_kernel[(batch, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part,
        lse,
        scale * LOG2E,
        splits,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        DIM_PAD=dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        MIN_PART=MIN_PARTITION,
        PRECISION=precision_of(q.dtype),
        num_warps=4,
        num_stages=2,
    )
    if splits > 1:
        _decode_merge_kernel[(batch, num_heads)](
            part,
            lse,
            context_lens,
            out,
            splits,
            num_heads,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            DIM_PAD=dim_pad,
            BLOCK_N=block_n,
            MIN_PART=MIN_PARTITION,
            num_warps=1,
        )
    return out
