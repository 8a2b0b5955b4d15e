"""The printed table (laid out as `vllm bench serve` prints it) and the result JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from bench.serve.client import RequestResult
from bench.serve.metrics import error_counts

WIDTH = 50
_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


def _row(label: str, value, fmt: str = "") -> str:
    text = "n/a" if value is None else format(value, fmt)
    return f"{label:<40} {text:<10}"


def _rule(title: str, fill: str = "-") -> str:
    return f"{title:{fill}^{WIDTH}}"


def format_table(
    metrics: dict,
    max_concurrency: int | None,
    request_rate: float,
    percentiles: Sequence[float],
    peak_output_throughput: float | None = None,
) -> str:
    """The result block: counts and throughputs, then mean/median/percentiles per latency."""
    lines = [
        _rule(" Serving Benchmark Result ", "="),
        _row("Successful requests:", metrics["completed"]),
        _row("Failed requests:", metrics["failed"]),
        _row("Maximum request concurrency:", max_concurrency),
        _row("Request rate configured (RPS):", request_rate, ".2f"),
        _row("Benchmark duration (s):", metrics["duration"], ".2f"),
        _row("Total input tokens:", metrics["total_input_tokens"]),
        _row("Total generated tokens:", metrics["total_output_tokens"]),
        _row("Request throughput (req/s):", metrics["request_throughput"], ".2f"),
    ]
    if metrics.get("request_goodput") is not None:
        lines.append(_row("Request goodput (req/s):", metrics["request_goodput"], ".2f"))
    lines.append(_row("Output token throughput (tok/s):", metrics["output_throughput"], ".2f"))
    if peak_output_throughput is not None:
        lines.append(_row("Peak output token throughput (tok/s):", peak_output_throughput, ".2f"))
    lines.append(_row("Peak concurrent requests:", metrics["max_concurrent_requests"]))
    lines.append(_row("Total Token throughput (tok/s):", metrics["total_token_throughput"], ".2f"))
    for key, (title, short) in _TITLES.items():
        lines.append(_rule(title))
        lines.append(_row(f"Mean {short} (ms):", metrics[f"mean_{key}_ms"], ".2f"))
        lines.append(_row(f"Median {short} (ms):", metrics[f"median_{key}_ms"], ".2f"))
        for p in percentiles:
            lines.append(_row(f"P{p:g} {short} (ms):", metrics[f"p{p:g}_{key}_ms"], ".2f"))
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def format_failures(results: Sequence[RequestResult], limit: int = 20) -> str:
    """Distinct failure messages with their counts; empty when nothing failed."""
    counts = error_counts(results)
    if not counts:
        return ""
    lines = [_rule(" Failures ")]
    for message, count in counts[:limit]:
        lines.append(f"{count:>5} x {message}")
    if len(counts) > limit:
        lines.append(f"  ... and {len(counts) - limit} more distinct errors (see the JSON)")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _gauge(stats: dict | None, fmt: str = ".2f") -> str:
    if not stats:
        return "n/a"
    return f"max {stats['max']:{fmt}}, mean {stats['mean']:{fmt}}"


def format_server_metrics(server: dict) -> str:
    """The scraped numbers, one per line."""
    ratio = server.get("encode_cache_hit_ratio")
    hits, misses = server.get("encode_cache_hits"), server.get("encode_cache_misses")
    cache = "n/a" if ratio is None else f"{ratio:.3f} ({hits:.0f} hits, {misses:.0f} misses)"
    prefix = server.get("prefix_cache_hit_ratio")
    lines = [
        _rule(" Server Metrics (scraped) "),
        _row("Scrapes (errors):", f"{server['num_scrapes']} ({server['num_scrape_errors']})"),
        _row("Encode cache hit ratio:", cache),
        _row("Encode call latency, mean (ms):", _ms(server.get("encode_request_latency_mean_ms"))),
        _row("Vision forward, mean (ms):", _ms(server.get("encode_forward_mean_ms"))),
        _row("Request encode time, mean (ms):", _ms(server.get("language_encode_latency_mean_ms"))),
        _row("Server TTFT, mean (ms):", _ms(server.get("server_ttft_mean_ms"))),
        _row("Requests waiting:", _gauge(server.get("num_requests_waiting"), ".1f")),
        _row("Requests running:", _gauge(server.get("num_requests_running"), ".1f")),
        _row("Encode queue depth:", _gauge(server.get("encode_queue_depth"), ".1f")),
        _row("KV cache usage ratio:", _gauge(server.get("kv_cache_usage_ratio"), ".3f")),
        _row("Prefix cache hit ratio:", "n/a" if prefix is None else f"{prefix:.3f}"),
        _row("Preemptions:", server.get("num_preemptions"), ".0f"),
    ]
    for replica, count in (server.get("requests_per_replica") or {}).items():
        lines.append(_row(f"Requests to {replica}:", count, ".0f"))
    for url, error in server.get("scrape_errors", {}).items():
        lines.append(f"  scrape of {url} failed: {error}")
    return "\n".join(lines)


def request_rows(results: Sequence[RequestResult]) -> list[dict]:
    """One row per request for the JSON `requests` list."""
    return [
        {
            "index": r.index,
            "start_s": r.start,
            "ttft_s": r.ttft if r.success else None,
            "e2el_s": r.e2el,
            "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens,
            "num_images": r.num_images,
            "success": r.success,
            "error": r.error,
        }
        for r in results
    ]


def build_result(
    header: dict, metrics: dict, results: Sequence[RequestResult], extra: dict
) -> dict:
    """vLLM's result keys (`date`, ..., per-request lists), then `requests` and `extra`."""
    ordered = sorted(results, key=lambda r: r.index)
    result = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), **header, **metrics}
    result.update(
        {
            "input_lens": [r.prompt_tokens for r in ordered],
            "output_lens": [r.output_tokens if r.success else 0 for r in ordered],
            "ttfts": [r.ttft if r.success else 0.0 for r in ordered],
            "itls": [r.itl for r in ordered],
            "generated_texts": [r.generated_text for r in ordered],
            "errors": [r.error for r in ordered],
            "requests": request_rows(ordered),
        }
    )
    result.update(extra)
    return result


def default_filename(
    backend: str, request_rate: float, max_concurrency: int | None, model_id: str
) -> str:
    """vLLM's naming: {backend}-{rate}qps[-concurrency{N}]-{model}-{date}.json."""
    concurrency = f"-concurrency{max_concurrency}" if max_concurrency is not None else ""
    model = model_id.rstrip("/").split("/")[-1]
    date = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{backend}-{request_rate}qps{concurrency}-{model}-{date}.json"


def save_result(result: dict, result_dir: str | None, filename: str) -> Path:
    """Write the JSON, creating the folder; returns the path."""
    path = Path(result_dir or ".") / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(result), indent=2, allow_nan=False))
    return path


def _finite(value):
    """NaN and infinity become null, which every JSON reader accepts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
