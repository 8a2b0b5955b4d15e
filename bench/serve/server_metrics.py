"""Prometheus scraping during a run, summarised beside the client-side numbers.

Counters and histograms are reported as the difference between the first and the last scrape,
so what the servers did before the run (warm-ups, earlier runs) does not count. Gauges (queue
depths, KV cache usage) are sampled every interval and reported as max and mean. Names of
vLLM's and SGLang's equivalents are read too, so the same flags work against those servers.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

ENCODE_CACHE_HITS = "splitvl_encode_cache_hits_total"
ENCODE_CACHE_MISSES = "splitvl_encode_cache_misses_total"

# Histograms whose mean over the run is reported, in milliseconds: (key, metric base names)
HISTOGRAMS = {
    "encode_request_latency": ("splitvl_encode_request_latency_seconds",),
    "encode_forward": ("splitvl_encode_forward_seconds",),
    "encode_queue_wait": ("splitvl_encode_queue_wait_seconds",),
    "language_encode_latency": ("splitvl_language_encode_latency_seconds",),
    "server_ttft": (
        "splitvl_language_time_to_first_token_seconds",
        "vllm:time_to_first_token_seconds",
        "sglang:time_to_first_token_seconds",
    ),
    "server_e2el": (
        "splitvl_language_e2e_request_latency_seconds",
        "vllm:e2e_request_latency_seconds",
        "sglang:e2e_request_latency_seconds",
    ),
}

# Gauges sampled over the run: (key, names, how several sources combine in one scrape)
GAUGES = {
    "num_requests_waiting": (
        (
            "splitvl_language_num_requests_waiting",
            "vllm:num_requests_waiting",
            "sglang:num_queue_reqs",
        ),
        "sum",
    ),
    "num_requests_running": (
        (
            "splitvl_language_num_requests_running",
            "vllm:num_requests_running",
            "sglang:num_running_reqs",
        ),
        "sum",
    ),
    "encode_queue_depth": (("splitvl_encode_queue_depth",), "sum"),
    "encode_inflight_requests": (("splitvl_encode_inflight_requests",), "sum"),
    "kv_cache_usage_ratio": (
        (
            "splitvl_language_kv_cache_usage_ratio",
            "vllm:kv_cache_usage_perc",
            "vllm:gpu_cache_usage_perc",
            "sglang:token_usage",
        ),
        "mean",
    ),
}

# Counters reported per label value: (key, metric, label). The router's requests per replica
# (the SGLang gateway's `smg_worker_requests_total{worker=URL}`, retries included).
LABELED_COUNTERS = {"requests_per_replica": ("smg_worker_requests_total", "worker")}

COUNTERS = {
    "prefix_cache_queries": ("splitvl_language_prefix_cache_queries_total",),
    "prefix_cache_hits": ("splitvl_language_prefix_cache_hits_total",),
    "num_preemptions": ("splitvl_language_num_preemptions_total", "vllm:num_preemptions_total"),
}


def parse_samples(text: str) -> dict[str, float]:
    """Sample name -> value summed over label sets (bucket and _created samples dropped); the
    counters of LABELED_COUNTERS also per label value, as `name{value}`."""
    labeled = {metric: label for metric, label in LABELED_COUNTERS.values()}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
            label = labeled.get(sample.name)
            if label is not None and label in sample.labels:
                key = f"{sample.name}{{{sample.labels[label]}}}"
                values[key] = values.get(key, 0.0) + float(sample.value)
    return values


@dataclass
class Scrape:
    """One scrape of one URL: its round, when the round began (s from the benchmark start),
    whether it was taken while requests ran (not the baseline or the final scrape), its samples.
    """

    round: int
    t: float
    url: str
    values: dict[str, float]
    during_run: bool = True


@dataclass
class MetricsScraper:
    """Scrapes each URL every `interval_s` until stopped; keeps every scrape."""

    urls: list[str]
    client: httpx.AsyncClient
    interval_s: float = 1.0
    scrapes: list[Scrape] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # url -> last error
    num_errors: int = 0
    origin: float = field(default_factory=time.perf_counter)
    num_rounds: int = 0

    async def scrape_once(self, during_run: bool = True) -> None:
        """Scrape every URL once, concurrently: one round."""
        self.num_rounds += 1
        t = time.perf_counter() - self.origin
        await asyncio.gather(
            *(self._scrape(url, self.num_rounds, t, during_run) for url in self.urls)
        )

    async def _scrape(self, url: str, round_number: int, t: float, during_run: bool) -> None:
        try:
            response = await self.client.get(url, timeout=5.0)
            response.raise_for_status()
            values = parse_samples(response.text)
        except Exception as exc:  # noqa: BLE001 - a failed scrape is noted, never fatal
            self.num_errors += 1
            self.errors[url] = f"{type(exc).__name__}: {exc}"[:300]
            return
        self.scrapes.append(Scrape(round_number, t, url, values, during_run))

    async def run(self, stop: asyncio.Event) -> None:
        """Scrape every interval until `stop` is set; the caller scrapes before and after.

        Rounds keep a fixed cadence from the start, so a slow answer does not stretch it.
        """
        next_round = time.perf_counter() + self.interval_s
        while True:
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, next_round - time.perf_counter()))
                return
            except TimeoutError:
                pass
            next_round += self.interval_s
            await self.scrape_once()
            next_round = max(next_round, time.perf_counter())  # skip rounds a slow scrape ate

    def summary(self) -> dict:
        """The `server_metrics` section of the result JSON."""
        by_url = {url: [s for s in self.scrapes if s.url == url] for url in self.urls}
        hits = _delta(by_url, (ENCODE_CACHE_HITS,))
        misses = _delta(by_url, (ENCODE_CACHE_MISSES,))
        looked_up = (hits or 0) + (misses or 0)
        out: dict = {
            "urls": self.urls,
            "num_scrapes": len(self.scrapes),
            "num_scrape_errors": self.num_errors,
            "scrape_errors": self.errors,
            "encode_cache_hits": hits,
            "encode_cache_misses": misses,
            "encode_cache_hit_ratio": hits / looked_up if hits is not None and looked_up else None,
        }
        for key, names in HISTOGRAMS.items():
            out[f"{key}_mean_ms"] = _histogram_mean_ms(by_url, names)
        for key, names in COUNTERS.items():
            out[key] = _delta(by_url, names)
        for key, (metric, _) in LABELED_COUNTERS.items():
            out[key] = _labeled_deltas(by_url, metric)
        queries, prefix_hits = out["prefix_cache_queries"], out["prefix_cache_hits"]
        out["prefix_cache_hit_ratio"] = prefix_hits / queries if queries else None
        times, series = self._gauge_series()
        for key, values in series.items():
            out[key] = {"max": max(values), "mean": sum(values) / len(values)} if values else None
        # Only gauges present in every round line up with the times
        full = {key: values for key, values in series.items() if len(values) == len(times)}
        out["timeline"] = {"t": times, **full}
        return out

    def _gauge_series(self) -> tuple[list[float], dict[str, list[float]]]:
        """Per scrape round, each gauge combined across the URLs that answered.

        Only rounds taken while requests ran count, unless the run was too short to have any:
        the idle baseline and final scrapes would pull the means down.
        """
        in_run = [s for s in self.scrapes if s.during_run]
        rounds: dict[int, list[Scrape]] = {}
        for scrape in in_run or self.scrapes:
            rounds.setdefault(scrape.round, []).append(scrape)
        times: list[float] = []
        series: dict[str, list[float]] = {key: [] for key in GAUGES}
        for scrapes in rounds.values():
            times.append(min(s.t for s in scrapes))
            for key, (names, how) in GAUGES.items():
                found = [v for s in scrapes if (v := _first(s.values, names)) is not None]
                if found:
                    series[key].append(sum(found) if how == "sum" else sum(found) / len(found))
        return times, series


def _first(values: dict[str, float], names: tuple[str, ...]) -> float | None:
    for name in names:
        if name in values:
            return values[name]
    return None


def _delta(by_url: dict[str, list[Scrape]], names: tuple[str, ...]) -> float | None:
    """Last minus first value of a counter, summed over URLs; None where no URL has it."""
    total, found = 0.0, False
    for scrapes in by_url.values():
        values = [v for s in scrapes if (v := _first(s.values, names)) is not None]
        if values:
            total += values[-1] - values[0]
            found = True
    return total if found else None


def _labeled_deltas(by_url: dict[str, list[Scrape]], metric: str) -> dict[str, float] | None:
    """Per label value of a LABELED_COUNTERS metric, its last minus first value; None without."""
    prefix = metric + "{"
    keys = {
        k for scrapes in by_url.values() for s in scrapes for k in s.values if k.startswith(prefix)
    }
    if not keys:
        return None
    return {key[len(prefix) : -1]: _delta(by_url, (key,)) or 0.0 for key in sorted(keys)}


def _histogram_mean_ms(by_url: dict[str, list[Scrape]], names: tuple[str, ...]) -> float | None:
    total = _delta(by_url, tuple(f"{n}_sum" for n in names))
    count = _delta(by_url, tuple(f"{n}_count" for n in names))
    if total is None or not count:
        return None
    return total / count * 1000.0
