"""CUDA graphs of decode-only steps, one per padded batch size.

Each graph is captured over views of the runner's persistent buffers (token ids, positions,
slots, fixed-width block tables, context lengths), so a replay after the host uploads a new
step computes that step. Sizes are captured largest first, sharing one memory pool. The graphs
know the runner only through two callables: `prepare(size)` fills and uploads the buffers of a
padded step of `size` rows, `forward(size)` runs the model on them and returns the logits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

_WARMUP_RUNS = 2


class DecodeGraphs:
    """Captures and replays the decode forward for each size in ``sizes``."""

    def __init__(
        self,
        sizes: tuple[int, ...],
        device: torch.device,
        prepare: Callable[[int], None],
        forward: Callable[[int], torch.Tensor],
    ):
        self.sizes = sizes
        self.device = device
        self._prepare = prepare
        self._forward = forward
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._pool = None
        self._captured = False
        self.capture_seconds = 0.0
        self.capture_bytes = 0  # device memory the graphs hold (their pool and outputs)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size (once); logs the time and the memory the graphs hold. Under
        inference mode, as the steps that replay them run: with autograd on, a model whose
        parameters require grad (a benchmark's random one) would keep every activation of the
        warm-up runs alive."""
        if self._captured:
            return
        device = self.device
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_reserved(device)
        t0 = time.perf_counter()
        stream = torch.cuda.Stream(device)
        for size in sorted(self.sizes, reverse=True):
            self._prepare(size)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(_WARMUP_RUNS):
                    self._forward(size)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._outputs[size] = self._forward(size)
            if self._pool is None:
                self._pool = graph.pool()
            self._graphs[size] = graph
        torch.cuda.synchronize(device)
        self.capture_bytes = torch.cuda.memory_reserved(device) - before
        self.capture_seconds = time.perf_counter() - t0
        log.info(
            "captured %d decode graphs (sizes %s) in %.1f s, %.0f MiB",
            len(self._graphs),
            list(self.sizes),
            self.capture_seconds,
            self.capture_bytes / 2**20,
        )
        self._captured = True

    def replay(self, size: int) -> torch.Tensor:
        self._graphs[size].replay()
        return self._outputs[size]
