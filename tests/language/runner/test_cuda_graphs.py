"""Decode graphs are captured (and warmed up) under inference mode, largest size first, over the
runner's prepare/forward callables: checked with torch.cuda's capture API stood in for, on a CPU."""

from __future__ import annotations

import contextlib
import types

import torch

from services.language.runner import cuda_graphs
from services.language.runner.cuda_graphs import DecodeGraphs


class _Graph:
    def __init__(self) -> None:
        self.replays = 0

    def pool(self):
        return "pool"

    def replay(self) -> None:
        self.replays += 1


def _fake_cuda(log: list) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        synchronize=lambda device=None: None,
        memory_reserved=lambda device=None: 0,
        Stream=lambda device=None: types.SimpleNamespace(wait_stream=lambda other: None),
        current_stream=lambda device=None: types.SimpleNamespace(wait_stream=lambda other: None),
        stream=lambda s: contextlib.nullcontext(),
        CUDAGraph=_Graph,
        graph=lambda graph, pool=None: _capturing(log, pool),
    )


@contextlib.contextmanager
def _capturing(log: list, pool):
    log.append(("capture", pool))
    yield


def test_capture_runs_in_inference_mode_largest_first_and_replays_its_outputs(monkeypatch):
    log: list = []
    monkeypatch.setattr(cuda_graphs.torch, "cuda", _fake_cuda(log))
    seen = []

    def prepare(size: int) -> None:
        log.append(("prepare", size))

    def forward(size: int) -> torch.Tensor:
        seen.append((size, torch.is_inference_mode_enabled()))
        return torch.full((size, 3), float(size))

    graphs = DecodeGraphs((1, 2, 4), torch.device("cpu"), prepare, forward)
    graphs.capture()
    assert all(inference for _, inference in seen)  # warm-ups and captures alike
    assert [size for size, _ in seen] == [4, 4, 4, 2, 2, 2, 1, 1, 1]  # 2 warm-ups + 1 capture
    assert [e for e in log if e[0] == "prepare"] == [("prepare", 4), ("prepare", 2), ("prepare", 1)]
    assert [pool for kind, pool in log if kind == "capture"] == [None, "pool", "pool"]
    assert torch.equal(graphs.replay(2), torch.full((2, 3), 2.0))
    graphs.capture()  # once only
    assert len(seen) == 9
