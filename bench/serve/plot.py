"""A one-page picture of a run: latency CDFs and a throughput / in-flight timeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.serve.client import RequestResult
from bench.serve.metrics import Timeline, tpot


def _cdf(ax, values_s: Sequence[float], title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, alpha=0.3)
    if not values_s:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    ms = np.sort(np.asarray(values_s, dtype=float) * 1000.0)
    ax.step(ms, np.arange(1, ms.size + 1) / ms.size, where="post")
    for p, style in ((50, ":"), (99, "--")):
        ax.axvline(np.percentile(ms, p), color="grey", linestyle=style, label=f"p{p}")
    ax.legend(loc="lower right")


def _timeline(ax, line: Timeline) -> None:
    ax.set_title("Throughput and requests in flight")
    ax.set_xlabel("time since start (s)")
    centers = np.asarray(line.starts) + line.bin_s / 2
    ax.plot(centers, line.output_tokens_per_s, color="tab:blue", marker=".")
    ax.set_ylabel("output tokens/s", color="tab:blue")
    ax.grid(True, alpha=0.3)
    twin = ax.twinx()
    twin.plot(centers, line.in_flight, color="tab:orange", marker=".")
    twin.set_ylabel("requests in flight (mean)", color="tab:orange")


def save_plot(
    path: str | Path, results: Sequence[RequestResult], line: Timeline, title: str
) -> Path:
    """Write a PNG with the TTFT, TPOT and E2EL CDFs and the timeline."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.success]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    _cdf(axes[0][0], [r.ttft for r in ok if r.ttft is not None], "TTFT")
    _cdf(axes[0][1], [t for t in (tpot(r) for r in ok) if t is not None], "TPOT")
    _cdf(axes[1][0], [r.e2el for r in ok], "E2E latency")
    _timeline(axes[1][1], line)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path
