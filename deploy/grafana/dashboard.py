"""Writes splitvl-dashboard.json, the Grafana dashboard over both services' Prometheus metrics and
the router's (smg's, whose names are pinned by its version: deploy/Dockerfile's SMG_SPEC).

    python deploy/grafana/dashboard.py          # rewrite deploy/grafana/splitvl-dashboard.json

The JSON is committed; tests/deploy/test_grafana.py checks that it matches this script and that
every metric an expression names exists in services/language/frontend/metrics.py or
services/encode/metrics.py. Import it in Grafana (Dashboards > New > Import) and pick the
Prometheus data source that scrapes the language service's /metrics (HTTP port) and each encode
replica's --metrics-port.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("splitvl-dashboard.json")
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
RATE = "$__rate_interval"
L = "splitvl_language_"
E = "splitvl_encode_"


def quantiles(histogram: str, qs=(0.5, 0.9, 0.99)) -> list[tuple[str, str]]:
    """histogram_quantile targets of a histogram (name without _bucket), one per quantile."""
    return [
        (
            f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket[{RATE}])))",
            f"p{round(q * 100)}",
        )
        for q in qs
    ]


def mean(histogram: str) -> tuple[str, str]:
    """Mean of a histogram over the rate window."""
    return (
        f"sum(rate({histogram}_sum[{RATE}])) / sum(rate({histogram}_count[{RATE}]))",
        f"mean {histogram.removeprefix(L).removeprefix(E)}",
    )


class Layout:
    """Places panels on Grafana's 24-column grid, left to right, then down."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.x = self.y = 0
        self.row_height = 0
        self.next_id = 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "id": self._id(),
                "collapsed": False,
                "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1},
                "panels": [],
            }
        )
        self.y += 1

    def panel(
        self,
        title: str,
        targets: list[tuple[str, str]],
        unit: str,
        *,
        w: int = 8,
        h: int = 8,
        kind: str = "timeseries",
        description: str = "",
        max_value: float | None = None,
    ) -> None:
        if self.x + w > 24:
            self._newline()
        defaults: dict = {"unit": unit}
        if max_value is not None:
            defaults.update({"min": 0, "max": max_value})
        panel = {
            "type": kind,
            "title": title,
            "description": description,
            "id": self._id(),
            "datasource": DS,
            "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {
                "legend": {"displayMode": "list", "placement": "bottom"},
                "tooltip": {"mode": "multi"},
            },
            "targets": [
                {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        if kind == "gauge":
            panel["options"] = {"reduceOptions": {"calcs": ["lastNotNull"]}}
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)

    def _newline(self) -> None:
        self.y += self.row_height
        self.x = self.row_height = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def build() -> dict:
    g = Layout()
    g.row("Language service: requests and tokens")
    g.panel(
        "Finished requests / s",
        [
            (
                f"sum by (finish_reason) (rate({L}requests_finished_total[{RATE}]))",
                "{{finish_reason}}",
            ),
            (f"sum by (status) (rate({L}requests_rejected_total[{RATE}]))", "rejected {{status}}"),
        ],
        "reqps",
        description="Requests that finished, by finish reason; errors by HTTP status.",
    )
    g.panel(
        "Token throughput",
        [
            (f"sum(rate({L}generation_tokens_total[{RATE}]))", "generated"),
            (f"sum(rate({L}prompt_tokens_total[{RATE}]))", "prompt (all)"),
            (f"sum(rate({L}image_tokens_total[{RATE}]))", "prompt (image)"),
        ],
        "short",
        description="Tokens per second.",
    )
    g.panel(
        "Queue depth",
        [
            (f"sum({L}num_requests_running)", "running"),
            (f"sum({L}num_requests_waiting)", "waiting"),
        ],
        "short",
        description="Requests being generated and waiting for the scheduler.",
    )
    g.row("Language service: latency")
    g.panel(
        "Time to first token",
        quantiles(f"{L}time_to_first_token_seconds") + [mean(f"{L}time_to_first_token_seconds")],
        "s",
    )
    g.panel(
        "Inter-token latency",
        quantiles(f"{L}inter_token_latency_seconds") + [mean(f"{L}inter_token_latency_seconds")],
        "s",
    )
    g.panel("End-to-end request latency", quantiles(f"{L}e2e_request_latency_seconds"), "s")
    g.panel(
        "Image encode time per request (language side)",
        quantiles(f"{L}encode_latency_seconds"),
        "s",
        description="Loading and encoding a request's images: the encode round trip.",
    )
    g.panel(
        "Generated tokens per request",
        quantiles(f"{L}request_generation_tokens") + [mean(f"{L}request_generation_tokens")],
        "short",
    )
    g.panel(
        "Preemptions / s",
        [
            (f"sum(rate({L}num_preemptions_total[{RATE}]))", "preemptions"),
        ],
        "short",
        description="Requests preempted to free KV cache (recomputed later).",
    )
    g.row("Language service: KV cache")
    g.panel(
        "KV cache usage",
        [(f"max({L}kv_cache_usage_ratio)", "used")],
        "percentunit",
        kind="gauge",
        w=6,
        max_value=1,
    )
    g.panel(
        "KV cache usage over time",
        [
            (f"{L}kv_cache_usage_ratio", "{{instance}}"),
        ],
        "percentunit",
        w=6,
        max_value=1,
    )
    g.panel(
        "KV cache blocks",
        [
            (f"sum({L}kv_cache_free_blocks)", "free"),
            (f"sum({L}kv_cache_total_blocks)", "total"),
        ],
        "short",
        w=6,
    )
    g.panel(
        "Prefix cache hit ratio",
        [
            (
                f"sum(rate({L}prefix_cache_hits_total[{RATE}])) / "
                f"sum(rate({L}prefix_cache_queries_total[{RATE}]))",
                "over the window",
            ),
            (f"max({L}prefix_cache_hit_ratio)", "since start"),
        ],
        "percentunit",
        w=6,
        max_value=1,
    )
    g.row("Encode service")
    g.panel(
        "Encode calls / s",
        [
            (f"sum by (code) (rate({E}requests_total[{RATE}]))", "{{code}}"),
            (f"sum(rate({E}images_total[{RATE}]))", "images"),
        ],
        "reqps",
        description="Encode calls by gRPC status code, and images returned.",
    )
    g.panel(
        "Encode cache hit ratio",
        [
            (
                f"sum(rate({E}cache_hits_total[{RATE}])) / (sum(rate({E}cache_hits_total[{RATE}])) "
                f"+ sum(rate({E}cache_misses_total[{RATE}])))",
                "all replicas",
            ),
            (
                f"sum by (instance) (rate({E}cache_hits_total[{RATE}])) / (sum by (instance) "
                f"(rate({E}cache_hits_total[{RATE}])) + sum by (instance) "
                f"(rate({E}cache_misses_total[{RATE}])))",
                "{{instance}}",
            ),
        ],
        "percentunit",
        max_value=1,
    )
    g.panel(
        "Encode call latency",
        quantiles(f"{E}request_latency_seconds") + [mean(f"{E}request_latency_seconds")],
        "s",
        description="Start of an Encode call to its last byte.",
    )
    g.panel(
        "Vision forward time", quantiles(f"{E}forward_seconds") + [mean(f"{E}forward_seconds")], "s"
    )
    g.panel(
        "Encode queue",
        [
            (f"{E}queue_depth", "waiting images {{instance}}"),
            (f"{E}inflight_requests", "calls in flight {{instance}}"),
        ],
        "short",
    )
    g.panel("Queue wait (longest per batch)", quantiles(f"{E}queue_wait_seconds"), "s")
    g.panel(
        "Batch size",
        [mean(f"{E}batch_images"), mean(f"{E}batch_patches")],
        "short",
        description="Images and patches per vision forward (mean over the window).",
    )
    g.panel(
        "Encode cache size",
        [
            (f"{E}cache_bytes", "bytes {{instance}}"),
        ],
        "bytes",
    )
    g.panel(
        "Embedding bytes sent / s",
        [
            (f"sum by (transport) (rate({E}transfer_bytes_total[{RATE}]))", "{{transport}}"),
            (f"sum({E}links)", "open links"),
        ],
        "Bps",
        description="Tensor bytes by transport (grpc inline, link); open links.",
    )
    g.panel("Cached images", [(f"{E}cache_entries", "{{instance}}")], "short")
    g.row("Router (smg, in front of the language replicas)")
    g.panel(
        "Requests per language replica / s",
        [(f"sum by (worker) (rate(smg_worker_requests_total[{RATE}]))", "{{worker}}")],
        "reqps",
        description="Requests the router sent to each replica (retries included).",
    )
    g.panel(
        "Retries / s",
        [
            (f"sum by (endpoint) (rate(smg_worker_retries_total[{RATE}]))", "{{endpoint}}"),
            (f"sum(rate(smg_worker_retries_exhausted_total[{RATE}]))", "exhausted"),
        ],
        "short",
        description="Requests retried on another replica after a 5xx, 429 or a failure.",
    )
    g.panel(
        "Circuit breakers",
        [
            ("max by (worker) (smg_worker_cb_state)", "{{worker}}"),
            ("min by (worker) (smg_worker_health)", "healthy {{worker}}"),
        ],
        "short",
        description="Per replica: breaker 0 closed, 1 open, 2 half-open; health 1 or 0.",
    )
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        ],
        "title": "splitvl: encode and language services",
        "uid": "splitvl-services",
        "description": "Disaggregated Qwen3-VL-MoE serving: TTFT, inter-token latency, "
        "throughput, queues, KV cache, encode cache and latency.",
        "tags": ["splitvl", "llm", "inference"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "DS_PROMETHEUS",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                }
            ]
        },
        "annotations": {"list": []},
        "panels": g.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
