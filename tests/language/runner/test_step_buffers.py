"""The staging buffer is not rewritten while an asynchronous upload may still read it: every
upload records an event, and the next step's first write waits on it."""

from __future__ import annotations

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
