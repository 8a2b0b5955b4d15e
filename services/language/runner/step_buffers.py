"""Persistent step buffers: every integer input of a forward, filled once per step on the host.

The runner owns one host staging buffer (pinned on CUDA) and one device buffer of the same
layout. Its fixed part holds int64 token ids, M-RoPE positions, cache slots, logits rows, decode
context lengths and the real rows of a padded step; after it, a compact int32 block-table area
holds only what the step uses: the decode rows' tables at the step's own width (rows x the most
blocks any decode row covers), then each prefill chunk's table. A step fills the host side with
numpy and moves the fixed part plus the used tables with ONE non-blocking copy, a few hundred
KiB where full-width tables were megabytes. The forward reads device views.

A captured CUDA graph reads fixed addresses and shapes: padded decode steps (the graphs' steps)
read a device-only table of the fixed width ``max_model_len / block_size``, into which
`scatter_decode_tables` copies the step's compact rows on the device (one copy). Its columns
past a row's context keep block ids of earlier steps: valid ids that no kernel dereferences
(the references gather and mask them).

The copy is asynchronous: it may still be reading the staging buffer when the host starts the
next step, which would hand the device a mix of two steps. Each upload records an event, and
`begin_step` waits on it before the first write of the next step (back-to-back prefill chunks of
a long prompt never synchronize otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# Region starts and prefill tables are aligned to this many bytes: Triton specializes kernels
# on 16-byte pointer alignment, so an unaligned table would compile a second variant.
ALIGN_BYTES = 64
TABLE_ALIGN = ALIGN_BYTES // 4  # int32 entries


@dataclass(frozen=True)
class BufferLimits:
    """The most one step can hold."""

    max_num_tokens: int
    max_num_seqs: int
    max_blocks_per_seq: int


def _aligned(n: int, to: int) -> int:
    return -(-n // to) * to


# (name, shape from the limits) of each int64 region of the fixed part, in layout order.
def _regions(limits: BufferLimits) -> list[tuple[str, tuple[int, ...]]]:
    t, s = limits.max_num_tokens, limits.max_num_seqs
    return [
        ("input_ids", (t,)),
        ("positions", (3, t)),
        ("slot_mapping", (t,)),
        ("logits_indices", (s,)),
        ("decode_context_lens", (s,)),
        ("num_valid_tokens", (1,)),  # rows of a padded step that are real tokens
    ]


class StepBuffers:
    """Host staging + device mirror of one step's integer inputs.

    int64 for what embedding, index_copy_ and gathers consume (no per-step conversion kernels);
    int32 block tables, which every attention kernel reads as they are.
    """

    def __init__(
        self,
        limits: BufferLimits,
        device: torch.device,
        scratch_block: int,
        staged: bool | None = None,
        new_event: Callable[[], object] | None = None,
    ):
        """`staged`: a separate device buffer filled by an asynchronous copy (default: on any
        device but the CPU, where the staging buffer is the device buffer and nothing is copied);
        `new_event` makes the event each upload records (default: a CUDA event)."""
        self.limits = limits
        self.device = device
        self.scratch_block = scratch_block
        s, b = limits.max_num_seqs, limits.max_blocks_per_seq
        offset, spans = 0, []
        for name, shape in _regions(limits):
            spans.append((name, shape, offset))
            offset = _aligned(offset + int(np.prod(shape)) * 8, ALIGN_BYTES)
        self._tables_at = offset
        # Every row of a step (decode or prefill) holds at most b entries, plus alignment.
        self.table_capacity = s * _aligned(b, TABLE_ALIGN)
        total = offset + self.table_capacity * 4
        staged = device.type != "cpu" if staged is None else staged
        self._host = torch.zeros(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self._device = (
            torch.zeros(total, dtype=torch.uint8, device=device) if staged else self._host
        )
        self._new_event = new_event or torch.cuda.Event
        self._copy_done = None  # the event of the upload that may still read the staging buffer
        host_np = self._host.numpy()
        self.host: dict[str, np.ndarray] = {}
        self.dev: dict[str, torch.Tensor] = {}
        for name, shape, start in spans:
            end = start + int(np.prod(shape)) * 8
            self.host[name] = host_np[start:end].view(np.int64).reshape(shape)
            self.dev[name] = self._device[start:end].view(torch.int64).view(shape)
        self._host_tables = host_np[offset:].view(np.int32)
        self.dev_tables = self._device[offset:].view(torch.int32)  # [table_capacity]
        # The graphs' fixed-width decode tables (device only).
        self.decode_block_tables = torch.zeros(s, b, dtype=torch.int32, device=device)
        self.decode_tables = self._host_tables[:0].reshape(0, 1)  # this step's [rows, width]
        self._tables_used = 0

    def begin_step(self, num_decodes: int, decode_width: int) -> None:
        """Before a step's first host write: wait until the last upload has read the staging
        buffer, then lay out this step's decode tables, `num_decodes` rows of `decode_width`
        entries pointing at the scratch block (`decode_tables`, filled by the runner)."""
        if self._copy_done is not None:
            self._copy_done.synchronize()
            self._copy_done = None
        used = num_decodes * decode_width
        self.decode_tables = self._host_tables[:used].reshape(num_decodes, decode_width)
        self.decode_tables.fill(self.scratch_block)
        self._tables_used = _aligned(used, TABLE_ALIGN)

    def add_prefill_table(self, blocks: np.ndarray) -> int:
        """Append one prefill chunk's block table; returns its start in `dev_tables`."""
        start = self._tables_used
        self._host_tables[start : start + len(blocks)] = blocks
        self._tables_used = _aligned(start + len(blocks), TABLE_ALIGN)
        return start

    def device_decode_tables(self, num_decodes: int, decode_width: int) -> torch.Tensor:
        """The step's compact decode tables on the device, ``[num_decodes, decode_width]``."""
        used = num_decodes * decode_width
        return self.dev_tables[:used].view(num_decodes, decode_width)

    def upload(self) -> None:
        """One host-to-device copy of the fixed part and the tables this step uses
        (non-blocking from pinned memory)."""
        if self._device is not self._host:
            end = self._tables_at + self._tables_used * 4
            self._device[:end].copy_(self._host[:end], non_blocking=True)
            self._copy_done = self._new_event()
            self._copy_done.record()

    def scatter_decode_tables(self, num_decodes: int, decode_width: int) -> torch.Tensor:
        """Copy the uploaded decode rows into the fixed-width table on the device (after
        `upload`, on its stream); returns its first `num_decodes` rows, full width."""
        compact = self.device_decode_tables(num_decodes, decode_width)
        self.decode_block_tables[:num_decodes, :decode_width].copy_(compact)
        return self.decode_block_tables[:num_decodes]
