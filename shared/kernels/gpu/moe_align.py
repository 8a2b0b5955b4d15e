"""The align step of the routed experts in Triton: rows grouped by expert, one program per expert.

Row ``r = t * k + j`` is token t's j-th expert choice. The rows are laid out grouped by expert,
each expert's run padded to a multiple of BLOCK_M, so every BLOCK_M-row block of the layout
belongs to one expert; padding slots hold the sentinel ``T * k``; rows of id E (routed to no
expert) are left out. Each program counts all rows (a histogram, linear in the rows) to find
where its expert's run starts, then writes only its own rows, in flat order, its padding and its
block ids: no program waits for another, the result does not depend on their order, and the
grid comes from shapes alone (graph-safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_rows", "max_blocks"])
def _align_kernel(
    ids_ptr,  # [num_rows] expert id of each row
    sorted_ptr,  # [max_blocks * BLOCK_M] int32, out: row ids grouped by expert
    block_expert_ptr,  # [max_blocks] int32, out: the expert of each block
    num_blocks_ptr,  # [1] int32, out: blocks in use
    num_rows,
    num_experts,
    max_blocks,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Program e lays out expert e's run: every program counts all rows (a histogram, linear
    in the rows) to find where the run starts, then writes only its own rows, padding and
    block ids, so no program waits for another."""
    expert = tl.program_id(0)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, num_rows, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + rows, mask=rows < num_rows, other=0).to(tl.int32)
        counts += tl.histogram(ids, E_PAD, mask=(rows < num_rows) & (ids < num_experts))
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    experts = tl.arange(0, E_PAD)
    first = tl.sum(tl.where(experts < expert, padded, 0), axis=0)  # the run's first slot
    count = tl.sum(tl.where(experts == expert, counts, 0), axis=0)
    end = first + (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    num_blocks = tl.sum(padded, axis=0) // BLOCK_M
    if expert == 0:
        tl.store(num_blocks_ptr, num_blocks)

    # The sentinel goes only where no row will be written, so no ordering between the two
    # stores is needed: slots [first + count, end).
    pad = first + count + tl.arange(0, BLOCK_M)
    tl.store(sorted_ptr + pad, tl.full([BLOCK_M], 0, tl.int32) + num_rows, mask=pad < end)
    for b0 in range(first // BLOCK_M, end // BLOCK_M, CHUNK):
        blocks = b0 + tl.arange(0, CHUNK)
        tl.store(
            block_expert_ptr + blocks,
            tl.full([CHUNK], 0, tl.int32) + expert,
            mask=blocks * BLOCK_M < end,
        )
    # Blocks past the last are never computed; keep their expert in range anyway.
    if expert == num_experts - 1:
        for b0 in range(num_blocks, max_blocks, CHUNK):
            blocks = b0 + tl.arange(0, CHUNK)
            tl.store(
                block_expert_ptr + blocks,
                tl.full([CHUNK], 0, tl.int32) + expert,
                mask=blocks < max_blocks,
            )

    # Stable: the expert's rows keep their flat order (rank within the chunk + running count).
    if count > 0:
        running = first
        for start in range(0, num_rows, CHUNK):
            rows = start + tl.arange(0, CHUNK)
            mine = tl.load(ids_ptr + rows, mask=rows < num_rows, other=num_experts) == expert
            hit = mine.to(tl.int32)
            rank = tl.cumsum(hit, axis=0) - hit
            tl.store(sorted_ptr + running + rank, rows, mask=mine)
            running += tl.sum(hit, axis=0)


def max_blocks(num_rows: int, num_experts: int, block_m: int) -> int:
    """Static bound on the blocks the align step can fill: each of at most min(E, rows) used
    experts pads by under BLOCK_M rows, and no layout has more blocks than rows."""
    used = min(num_experts, num_rows)
    return min(triton.cdiv(num_rows + used * (block_m - 1), block_m), num_rows)


def align_block_size(
    ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows grouped by expert, padded per expert to ``block_m`` (sentinel ``ids.numel()``).

    Returns (sorted rows ``[max_blocks * block_m]`` int32, expert per block ``[max_blocks]``
    int32, blocks in use ``[1]`` int32); only the first ``num_blocks`` blocks are defined.
    """
    flat = ids.reshape(-1)
    num_rows = flat.numel()
    blocks = max_blocks(num_rows, num_experts, block_m)
    sorted_rows = torch.empty(blocks * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=ids.device)
    num_blocks = torch.empty(1, dtype=torch.int32, device=ids.device)
    _align_kernel[(num_experts,)](
        flat,
        sorted_rows,
        block_expert,
        num_blocks,
        num_rows,
        num_experts,
        blocks,
        BLOCK_M=block_m,
        E_PAD=triton.next_power_of_2(num_experts),
        CHUNK=1024,
        num_warps=4,
    )
    return sorted_rows, block_expert, num_blocks
