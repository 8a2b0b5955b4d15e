"""The run itself: arrivals, the concurrency cap, warm-ups, the progress bar, scraping.

Arrival times are drawn up front (gamma-distributed gaps, as vLLM's `--burstiness` does), and
each request waits for its time and then for a slot under `--max-concurrency`; a request's
`start` is when it was actually sent, so queueing behind the cap is not charged to the server.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np
from tqdm import tqdm

from bench.serve.client import RequestOptions, RequestResult, send_request
from bench.serve.datasets import BenchRequest
from bench.serve.server_metrics import MetricsScraper


def arrival_offsets(
    num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Send times (s from the start) of each request; all 0 for an infinite rate.

    Gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate for any shape;
    shape 1 is a Poisson process, below 1 burstier, above 1 more regular.
    """
    if num_requests <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    if request_rate <= 0 or burstiness <= 0:
        raise ValueError("request rate and burstiness must be positive")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(
        shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests - 1
    )
    return [0.0, *np.cumsum(gaps).tolist()]


@dataclass(frozen=True)
class RunConfig:
    """How to pace the requests."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    show_progress: bool = True
    metrics_urls: tuple[str, ...] = ()
    scrape_interval_s: float = 1.0


@dataclass
class RunOutcome:
    """Everything measured: per-request results, wall time, warm-up failures, server metrics."""

    results: list[RequestResult]
    duration: float
    warmup_results: list[RequestResult] = field(default_factory=list)
    server_metrics: dict | None = None


def make_client(timeout_s: float, max_connections: int | None) -> httpx.AsyncClient:
    # httpx caps a pool at 100 connections by default, which would cap concurrency silently
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=None)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0))
    return httpx.AsyncClient(timeout=timeout, limits=limits)


async def run_benchmark(
    requests: Sequence[BenchRequest],
    options: RequestOptions,
    config: RunConfig,
    warmups: Sequence[BenchRequest] = (),
) -> RunOutcome:
    """Warm up, then send `requests` on their arrival schedule and time each one."""
    # Scrapes get a client of their own: in the requests' pool they would wait for a free
    # connection (seeing the server only between requests) and delay the requests they displace
    async with (
        make_client(options.timeout_s, config.max_concurrency) as client,
        httpx.AsyncClient(timeout=5.0) as scrape_client,
    ):
        semaphore = asyncio.Semaphore(config.max_concurrency or len(requests) or 1)
        warmup_results = await _warm_up(client, warmups, options, semaphore)
        scraper = MetricsScraper(list(config.metrics_urls), scrape_client, config.scrape_interval_s)
        if config.metrics_urls:
            await scraper.scrape_once(during_run=False)  # where the counter deltas start
        offsets = arrival_offsets(
            len(requests), config.request_rate, config.burstiness, config.seed
        )
        bar = tqdm(
            total=len(requests), disable=not config.show_progress, unit="req", dynamic_ncols=True
        )
        origin = time.perf_counter()
        for scrape in scraper.scrapes:  # the baseline came just before the start
            scrape.t -= origin - scraper.origin
        scraper.origin = origin
        stop = asyncio.Event()
        scraping = asyncio.create_task(scraper.run(stop)) if config.metrics_urls else None
        try:
            tasks = [
                asyncio.create_task(
                    _paced(client, request, options, i, origin, offset, semaphore, bar)
                )
                for i, (request, offset) in enumerate(zip(requests, offsets, strict=True))
            ]
            results = list(await asyncio.gather(*tasks))
            duration = time.perf_counter() - origin
        finally:
            bar.close()
            stop.set()
            if scraping is not None:
                await scraping
        server_metrics = None
        if config.metrics_urls:
            await scraper.scrape_once(during_run=False)  # the counters' end values
            server_metrics = scraper.summary()
    return RunOutcome(results, duration, warmup_results, server_metrics)


async def _paced(
    client: httpx.AsyncClient,
    request: BenchRequest,
    options: RequestOptions,
    index: int,
    origin: float,
    offset: float,
    semaphore: asyncio.Semaphore,
    bar: tqdm,
) -> RequestResult:
    delay = origin + offset - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    async with semaphore:
        result = await send_request(client, request, options, index, origin)
    bar.update(1)
    return result


async def _warm_up(
    client: httpx.AsyncClient,
    warmups: Sequence[BenchRequest],
    options: RequestOptions,
    semaphore: asyncio.Semaphore,
) -> list[RequestResult]:
    """Untimed requests first, under the same concurrency cap, all sent at once."""

    async def one(i: int, request: BenchRequest) -> RequestResult:
        async with semaphore:
            return await send_request(client, request, options, i, time.perf_counter())

    return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(warmups))))
