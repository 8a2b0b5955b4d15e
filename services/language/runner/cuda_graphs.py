"""CUDA graphs of decode-only steps, one per padded batch size.

Each graph is captured over views of the runner's persistent buffers (token ids, positions,
slots, fixed-width block tables, context lengths), so a replay after the host uploads a new
step computes that step. Sizes are captured largest first, sharing one memory pool.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.language.runner.model_runner import ModelRunner

log = logging.getLogger(__name__)

_WARMUP_RUNS = 2


class DecodeGraphs:
    """Captures and replays the decode forward for each size in ``sizes``."""

    def __init__(self, runner: ModelRunner, sizes: tuple[int, ...]):
        self.runner = runner
        self.sizes = sizes
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._pool = None
        self._captured = False

    def capture(self) -> None:
        """Capture every size (once); logs the time and the memory the graphs hold."""
        if self._captured:
            return
        from services.language.runner.model_runner import StepBatch

        runner = self.runner
        width = runner.buffers.limits.max_blocks_per_seq
        device = runner.device
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_reserved(device)
        t0 = time.perf_counter()
        stream = torch.cuda.Stream(device)
        for size in sorted(self.sizes, reverse=True):
            runner.buffers.reset_tables(size, 0)
            runner._fill_padding(0, size)
            runner.buffers.upload()
            batch = StepBatch(size, size, width, (), size, size, (), None)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(_WARMUP_RUNS):
                    runner.forward(batch)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._outputs[size] = runner.forward(batch)
            if self._pool is None:
                self._pool = graph.pool()
            self._graphs[size] = graph
        torch.cuda.synchronize(device)
        used = torch.cuda.memory_reserved(device) - before
        log.info(
            "captured %d decode graphs (sizes %s) in %.1f s, %.0f MiB",
            len(self._graphs),
            list(self.sizes),
            time.perf_counter() - t0,
            used / 2**20,
        )
        self._captured = True

    def replay(self, size: int) -> torch.Tensor:
        self._graphs[size].replay()
        return self._outputs[size]
