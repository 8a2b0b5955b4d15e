"""Prometheus metrics of the language service.

Each server owns its registry (several servers can live in one test process). Latencies and token
counts are recorded by the API as requests stream; engine state (running and waiting requests, KV
usage, prefix cache) is read from `engine.stats()` at scrape time, so it is never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PREFIX = "splitvl_language_"
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)


class _EngineCollector(Collector):
    """Reads the engine's gauges when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._stats()
        gauges = {
            "num_requests_running": ("Requests being generated", stats.num_running),
            "num_requests_waiting": ("Requests waiting for the scheduler", stats.num_waiting),
            "kv_cache_usage_ratio": ("Fraction of KV cache blocks in use (0..1)", stats.kv_usage),
            "kv_cache_free_blocks": ("Free KV cache blocks", stats.num_free_blocks),
            "kv_cache_total_blocks": ("KV cache blocks in all", stats.num_total_blocks),
            "prefix_cache_hit_ratio": (
                "Prompt tokens served from the prefix cache / prompt tokens looked up",
                stats.prefix_cache_hits / stats.prefix_cache_queries
                if stats.prefix_cache_queries
                else 0.0,
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(_PREFIX + name, doc, value=float(value))
        counters = {
            "prefix_cache_queries": "Prompt tokens looked up in the prefix cache",
            "prefix_cache_hits": "Prompt tokens found in the prefix cache",
            "num_preemptions": "Requests preempted to free KV cache",
        }
        for name, doc in counters.items():
            yield CounterMetricFamily(_PREFIX + name, doc, value=float(getattr(stats, name)))


class LanguageMetrics:
    """The service's histograms and counters, in a registry of their own."""

    def __init__(self, engine_stats: Callable[[], Any] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.time_to_first_token = Histogram(
            _PREFIX + "time_to_first_token_seconds",
            "Arrival of a request to its first generated token",
            registry=reg,
            buckets=_LATENCY_BUCKETS,
        )
        self.inter_token_latency = Histogram(
            _PREFIX + "inter_token_latency_seconds",
            "Time between successive streamed tokens of a request",
            registry=reg,
            buckets=_LATENCY_BUCKETS,
        )
        self.e2e_latency = Histogram(
            _PREFIX + "e2e_request_latency_seconds",
            "Arrival of a request to its last token",
            registry=reg,
            buckets=_LATENCY_BUCKETS,
        )
        self.encode_latency = Histogram(
            _PREFIX + "encode_latency_seconds",
            "Time to load and encode the images of one request (encode service round trip)",
            registry=reg,
            buckets=_LATENCY_BUCKETS,
        )
        self.prompt_tokens = Counter(
            _PREFIX + "prompt_tokens", "Prompt tokens (image tokens included)", registry=reg
        )
        self.image_tokens = Counter(
            _PREFIX + "image_tokens", "Prompt tokens that are image embeddings", registry=reg
        )
        self.generation_tokens = Counter(
            _PREFIX + "generation_tokens", "Tokens generated", registry=reg
        )
        self.requests_finished = Counter(
            _PREFIX + "requests_finished",
            "Finished requests by finish reason",
            ["finish_reason"],
            registry=reg,
        )
        self.requests_rejected = Counter(
            _PREFIX + "requests_rejected",
            "Requests answered with an error, by HTTP status",
            ["status"],
            registry=reg,
        )
        self.output_length = Histogram(
            _PREFIX + "request_generation_tokens",
            "Generated tokens per request",
            registry=reg,
            buckets=_TOKEN_BUCKETS,
        )
        if engine_stats is not None:
            reg.register(_EngineCollector(engine_stats))

    def rejected(self, status: int) -> None:
        """Count a request answered with an error status."""
        self.requests_rejected.labels(status=str(int(status))).inc()

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class RequestTimer:
    """Tracks one request's token timing and feeds the latency histograms."""

    def __init__(self, metrics: LanguageMetrics, arrival_time: float) -> None:
        self._metrics = metrics
        self._arrival = arrival_time
        self._last: float | None = None

    def on_tokens(self, now: float, num_tokens: int) -> None:
        """Record a delta of `num_tokens` new tokens that arrived at `now` (time.monotonic)."""
        if num_tokens <= 0:
            return
        if self._last is None:
            self._metrics.time_to_first_token.observe(now - self._arrival)
        else:
            # Tokens of one delta arrived together; spread the gap over them
            gap = (now - self._last) / num_tokens
            for _ in range(num_tokens):
                self._metrics.inter_token_latency.observe(gap)
        self._last = now
        self._metrics.generation_tokens.inc(num_tokens)

    def on_finish(self, now: float, finish_reason: str | None, num_output_tokens: int) -> None:
        """Record the end of the request."""
        self._metrics.e2e_latency.observe(now - self._arrival)
        self._metrics.requests_finished.labels(finish_reason=finish_reason or "abort").inc()
        self._metrics.output_length.observe(num_output_tokens)
