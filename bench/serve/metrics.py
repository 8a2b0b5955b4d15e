"""Client-side metrics of a run, with the names and definitions of `vllm bench serve`.

Latency statistics cover successful requests only. TPOT is (E2EL - TTFT) / (output tokens - 1)
for requests with more than one output token; for goodput, a one-token request's TPOT counts
as 0, as in vLLM. ITL statistics pool the gaps of every request.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bench.serve.client import RequestResult

SLO_METRICS = ("ttft", "tpot", "e2el")
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def percentile(values: Sequence[float], p: float) -> float:
    """numpy's linear-interpolation percentile; 0 for no values (vLLM reports 0 there)."""
    return float(np.percentile(values, p)) if len(values) else 0.0


def tpot(result: RequestResult) -> float | None:
    """Time per output token after the first, or None with fewer than two output tokens."""
    if result.output_tokens <= 1 or result.ttft is None:
        return None
    return (result.e2el - result.ttft) / (result.output_tokens - 1)


def latency_stats(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict:
    """{mean,median,std,p..}_{name}_ms from values in seconds."""
    ms = np.asarray(values_s, dtype=float) * 1000.0
    stats = {
        f"mean_{name}_ms": float(ms.mean()) if ms.size else 0.0,
        f"median_{name}_ms": float(np.median(ms)) if ms.size else 0.0,
        f"std_{name}_ms": float(ms.std()) if ms.size else 0.0,
    }
    for p in percentiles:
        stats[f"p{p:g}_{name}_ms"] = percentile(ms, p)
    return stats


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(
                f"bad goodput SLO {item!r}; use KEY:MS with KEY one of "
                f"{', '.join(SLO_METRICS)}, e.g. ttft:500"
            )
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"bad goodput SLO {item!r}: {value!r} is not a number") from None
        if slos[name] < 0:
            raise ValueError(f"bad goodput SLO {item!r}: must be >= 0 ms")
    return slos


def meets_slos(result: RequestResult, slos: dict[str, float]) -> bool:
    """A successful request whose every given SLO (ms) holds."""
    if not result.success:
        return False
    values = {"ttft": result.ttft or 0.0, "tpot": tpot(result) or 0.0, "e2el": result.e2el}
    return all(values[name] * 1000.0 <= limit for name, limit in slos.items())


@dataclass(frozen=True)
class Timeline:
    """Per-bin output token throughput and requests in flight over the run."""

    bin_s: float
    starts: list[float]
    output_tokens_per_s: list[float]
    in_flight: list[float]

    def to_dict(self) -> dict:
        return {
            "bin_s": self.bin_s,
            "t": self.starts,
            "output_tokens_per_s": self.output_tokens_per_s,
            "in_flight": self.in_flight,
        }


def timeline(results: Sequence[RequestResult], duration: float, bin_s: float = 1.0) -> Timeline:
    """Output tokens per second and mean in-flight requests, in bins of `bin_s` seconds.

    A request's usage count is spread evenly over its text chunks, so a server that packs
    several tokens into a chunk still adds up to the reported total.
    """
    num_bins = max(1, int(np.ceil(duration / bin_s)))
    tokens = np.zeros(num_bins)
    busy = np.zeros(num_bins)  # request-seconds spent in flight, per bin
    edges = np.arange(num_bins + 1) * bin_s
    for r in results:
        if r.chunk_times and r.success:
            weight = r.output_tokens / len(r.chunk_times)
            bins = np.minimum((np.asarray(r.chunk_times) / bin_s).astype(int), num_bins - 1)
            np.add.at(tokens, bins, weight)
        end = r.start + r.e2el
        busy += np.clip(np.minimum(edges[1:], end) - np.maximum(edges[:-1], r.start), 0, None)
    return Timeline(bin_s, edges[:-1].tolist(), (tokens / bin_s).tolist(), (busy / bin_s).tolist())


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """Most requests in flight at one instant."""
    events = sorted(
        [(r.start, 1) for r in results] + [(r.start + r.e2el, -1) for r in results],
        key=lambda e: (e[0], e[1]),
    )
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def compute_metrics(
    results: Sequence[RequestResult],
    duration: float,
    slos: dict[str, float] | None = None,
    percentiles: Sequence[float] = (90, 99),
) -> dict:
    """The aggregate numbers, keyed as vLLM's result JSON keys them."""
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_tokens for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    duration = max(duration, 1e-9)
    series = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [t for t in (tpot(r) for r in ok) if t is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.e2el for r in ok],
    }
    metrics = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration,
        "request_goodput": (sum(meets_slos(r, slos) for r in results) / duration if slos else None),
        "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "max_concurrent_requests": peak_concurrency(results),
    }
    for name in LATENCY_METRICS:
        metrics.update(latency_stats(name, series[name], percentiles))
    return metrics


def error_counts(results: Sequence[RequestResult]) -> list[tuple[str, int]]:
    """Distinct error messages of the failed requests, most frequent first."""
    return Counter(r.error for r in results if not r.success).most_common()
