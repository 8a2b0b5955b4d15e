"""Prometheus metrics of the encode service, on a registry of its own."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_PATCH_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144)


class EncodeMetrics:
    """Request, batch, queue and cache metrics; `render()` gives the text exposition format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "splitvl_encode_requests", "Encode calls by gRPC status code", ["code"], registry=r
        )
        self.images = Counter("splitvl_encode_images", "Images returned", registry=r)
        self.latency = Histogram(
            "splitvl_encode_request_latency_seconds",
            "Encode call latency, start to last byte",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_images = Histogram(
            "splitvl_encode_batch_images",
            "Images per vision forward",
            buckets=_COUNT_BUCKETS,
            registry=r,
        )
        self.batch_patches = Histogram(
            "splitvl_encode_batch_patches",
            "Patches per vision forward",
            buckets=_PATCH_BUCKETS,
            registry=r,
        )
        self.forward_seconds = Histogram(
            "splitvl_encode_forward_seconds",
            "Vision forward time",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "splitvl_encode_queue_wait_seconds",
            "Longest wait of an image in each batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "splitvl_encode_queue_depth", "Images waiting for the tower", registry=r
        )
        self.inflight = Gauge(
            "splitvl_encode_inflight_requests", "Encode calls in progress", registry=r
        )
        self.cache_hits = Counter(
            "splitvl_encode_cache_hits", "Images served from the cache", registry=r
        )
        self.cache_misses = Counter(
            "splitvl_encode_cache_misses", "Images run through the tower", registry=r
        )
        self.cache_bytes = Gauge(
            "splitvl_encode_cache_bytes", "Bytes held by the cache", registry=r
        )
        self.cache_entries = Gauge(
            "splitvl_encode_cache_entries", "Images held by the cache", registry=r
        )
        self.transfer_bytes = Counter(
            "splitvl_encode_transfer_bytes",
            "Tensor bytes sent, by transport",
            ["transport"],
            registry=r,
        )
        self.links = Gauge("splitvl_encode_links", "Open torch.distributed links", registry=r)
        self.shm_pools = Gauge(
            "splitvl_encode_shm_pools", "Shared-memory pools of clients mapped", registry=r
        )

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def serve_http(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on a daemon thread; port 0 picks one. Returns the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
