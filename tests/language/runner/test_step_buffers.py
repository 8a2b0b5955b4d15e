"""The staging buffer is not rewritten while an asynchronous upload may still read it: every
upload records an event, and the next step's first write waits on it."""

from __future__ import annotations

import numpy as np
import torch

from services.language.runner.step_buffers import BufferLimits, StepBuffers


class _Event:
    """A CUDA event stand-in that logs what the buffers do with it."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.id = sum(1 for entry in log if entry.startswith("record"))

    def record(self) -> None:
        self.log.append(f"record {self.id}")

    def synchronize(self) -> None:
        self.log.append(f"wait {self.id}")


def _staged(log: list[str]) -> StepBuffers:
    limits = BufferLimits(max_num_tokens=8, max_num_seqs=4, max_blocks_per_seq=3)
    return StepBuffers(limits, torch.device("cpu"), 0, staged=True, new_event=lambda: _Event(log))


def test_each_step_waits_for_the_previous_upload_before_writing():
    log: list[str] = []
    buffers = _staged(log)
    buffers.begin_step(2, 0)  # nothing uploaded yet: nothing to wait for
    buffers.host["input_ids"][:2] = [5, 6]
    buffers.upload()
    buffers.begin_step(0, 1)  # a prefill chunk right after: must wait for upload 0
    buffers.host["input_ids"][:3] = [7, 8, 9]
    buffers.upload()
    buffers.begin_step(1, 0)
    assert log == ["record 0", "wait 0", "record 1", "wait 1"]
    assert buffers.dev["input_ids"][:3].tolist() == [7, 8, 9]  # the device got the second step
    buffers.begin_step(1, 0)  # waited once already: no second wait on the same upload
    assert log == ["record 0", "wait 0", "record 1", "wait 1"]


def test_on_a_cpu_the_staging_buffer_is_the_device_buffer_and_nothing_waits():
    log: list[str] = []
    limits = BufferLimits(max_num_tokens=8, max_num_seqs=4, max_blocks_per_seq=3)
    buffers = StepBuffers(limits, torch.device("cpu"), 0, new_event=lambda: _Event(log))
    buffers.begin_step(1, 0)
    buffers.host["input_ids"][0] = 3
    buffers.upload()
    buffers.begin_step(1, 0)
    assert log == [] and buffers.dev["input_ids"][0] == 3


def test_tables_are_int32_compact_and_only_what_a_step_uses_is_uploaded():
    """Decode rows at the step's own width, then each prefill table at a 16-entry boundary;
    the upload copies the fixed part and those tables only, never the whole table area."""
    limits = BufferLimits(max_num_tokens=8, max_num_seqs=4, max_blocks_per_seq=40)
    buffers = StepBuffers(
        limits, torch.device("cpu"), 99, staged=True, new_event=lambda: _Event([])
    )
    buffers.begin_step(2, 3)
    assert buffers.decode_tables.shape == (2, 3) and (buffers.decode_tables == 99).all()
    buffers.decode_tables[0, :2] = [5, 6]
    buffers.decode_tables[1, :3] = [7, 8, 9]
    first = buffers.add_prefill_table(np.arange(10, 30))
    second = buffers.add_prefill_table(np.array([1, 2]))
    assert (first, second) == (16, 48)  # aligned: one compiled kernel variant for every start
    buffers.dev_tables.fill_(-1)
    buffers.upload()
    assert buffers.dev_tables.dtype == torch.int32
    decode = buffers.device_decode_tables(2, 3)
    assert decode.tolist() == [[5, 6, 99], [7, 8, 9]]
    assert buffers.dev_tables[first : first + 20].tolist() == list(range(10, 30))
    assert buffers.dev_tables[second : second + 2].tolist() == [1, 2]
    assert (buffers.dev_tables[64:] == -1).all()  # past the used tables: not copied
    # A graph step: the rows land in the fixed-width table at fixed addresses.
    fixed = buffers.scatter_decode_tables(2, 3)
    assert fixed.shape == (2, 40) and fixed.data_ptr() == buffers.decode_block_tables.data_ptr()
    assert fixed[:, :3].tolist() == [[5, 6, 99], [7, 8, 9]]
