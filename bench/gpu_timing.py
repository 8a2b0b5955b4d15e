"""GPU timing for the kernel benchmarks and the tile tuner: CUDA-graph captures timed with
CUDA events, so the numbers are GPU time without Python launch cost (CUDA only)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def captured(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured in a CUDA graph (after a warm-up that compiles every kernel)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def elapsed_ms(run: Callable[[], None]) -> float:
    """GPU time of one call of `run`, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def alternate(passes: dict[str, Callable[[], object]], rounds: int, layers: int):
    """Per-layer median ms of each pass, captured in graphs, alternating within rounds. A pass
    that cannot be captured runs eagerly (its time then includes launch overhead)."""
    runs = {}
    for name, fn in passes.items():
        try:
            runs[name] = captured(fn)
        except RuntimeError as exc:
            print(f"  {name}: not capturable ({str(exc).splitlines()[0]}); timing it eagerly")
            runs[name] = fn
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(elapsed_ms(run) / layers)
    return {name: statistics.median(ts) for name, ts in times.items()}
