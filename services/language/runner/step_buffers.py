"""Persistent step buffers: every integer input of a forward, filled once per step on the host.

The runner owns one host staging buffer (pinned on CUDA) and one device buffer of the same
layout: token ids, M-RoPE positions, cache slots, logits rows, decode block tables and context
lengths, the real rows of a padded step, prefill block tables. A step fills the host side with
numpy and moves it with ONE non-blocking copy; the forward reads device views at fixed addresses,
which is what lets a captured CUDA graph replay on new data. Block tables have the fixed width
``max_model_len / block_size``; unused entries point at the scratch block.

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


@dataclass(frozen=True)
class BufferLimits:
    """The most one step can hold."""

    max_num_tokens: int
    max_num_seqs: int
    max_blocks_per_seq: int


# (name, shape from the limits) of each region, in layout order.
def _regions(limits: BufferLimits) -> list[tuple[str, tuple[int, ...]]]:
    t, s, b = limits.max_num_tokens, limits.max_num_seqs, limits.max_blocks_per_seq
    return [
        ("input_ids", (t,)),
        ("positions", (3, t)),
        ("slot_mapping", (t,)),
        ("logits_indices", (s,)),
        ("decode_block_tables", (s, b)),
        ("decode_context_lens", (s,)),
        ("num_valid_tokens", (1,)),  # rows of a padded step that are real tokens
        ("prefill_block_tables", (s, b)),
    ]


class StepBuffers:
    """Host staging + device mirror of one step's integer inputs (int64 throughout).

    int64 because the ops that consume them (embedding, index_copy_, index_select, gathers) take
    it natively: no per-step dtype conversion kernels.
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
        layout = _regions(limits)
        total = sum(int(np.prod(shape)) for _, shape in layout)
        staged = device.type != "cpu" if staged is None else staged
        self._host = torch.zeros(total, dtype=torch.int64, pin_memory=device.type == "cuda")
        self._device = (
            torch.zeros(total, dtype=torch.int64, device=device) if staged else self._host
        )
        self._new_event = new_event or torch.cuda.Event
        self._copy_done = None  # the event of the upload that may still read the staging buffer
        self._host_np = self._host.numpy()
        self.host: dict[str, np.ndarray] = {}
        self.dev: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in layout:
            size = int(np.prod(shape))
            self.host[name] = self._host_np[offset : offset + size].reshape(shape)
            self.dev[name] = self._device[offset : offset + size].view(shape)
            offset += size
        self._used = total

    def begin_step(self, num_decodes: int, num_prefills: int) -> None:
        """Before a step's first host write: wait until the last upload has read the staging
        buffer, then point every entry of the table rows about to be written at the scratch
        block."""
        if self._copy_done is not None:
            self._copy_done.synchronize()
            self._copy_done = None
        self.host["decode_block_tables"][:num_decodes] = self.scratch_block
        self.host["prefill_block_tables"][:num_prefills] = self.scratch_block

    def upload(self) -> None:
        """One host-to-device copy of the whole layout (non-blocking from pinned memory)."""
        if self._device is not self._host:
            self._device.copy_(self._host, non_blocking=True)
            self._copy_done = self._new_event()
            self._copy_done.record()
