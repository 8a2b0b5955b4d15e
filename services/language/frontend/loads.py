"""The load report routers read from a replica (`GET /v1/loads`, the SGLang gateway's format).

The gateway's load-aware policies (`power_of_two`, `least_load`) score a replica by the prompt
tokens it has queued over its generation throughput plus a KV-pressure term, and its overload
guard skips a replica reporting 8 or more waiting requests or 80% KV usage. Every count is an
integer on the wire: the gateway stops polling a replica whose report does not parse.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from services.language.frontend.ports import EngineClient

_MIN_RATE_WINDOW_S = 1.0  # throughput over at least this long (polls come every few seconds)


class LoadReporter:
    """Builds the report from engine snapshots; the generation rate is measured between
    successive reports (the first report says 0)."""

    def __init__(self, engine: EngineClient, clock=time.monotonic) -> None:
        self._engine = engine
        self._clock = clock
        self._mark: tuple[float, int] | None = None  # (time, tokens generated) of the window start
        self._rate = 0.0

    def _throughput(self, generated: int) -> float:
        now = self._clock()
        if self._mark is None:
            self._mark = (now, generated)
        elif now - self._mark[0] >= _MIN_RATE_WINDOW_S:
            start, before = self._mark
            self._rate = (generated - before) / (now - start)
            self._mark = (now, generated)
        return self._rate

    def report(self) -> dict:
        """`{"timestamp", "dp_rank_count", "loads": [one entry]}`."""
        stats = self._engine.stats()
        total_tokens = stats.num_total_blocks * stats.block_size
        used_tokens = (stats.num_total_blocks - stats.num_free_blocks) * stats.block_size
        queries = stats.prefix_cache_queries
        load = {
            "dp_rank": 0,
            "num_running_reqs": int(stats.num_running),
            "num_waiting_reqs": int(stats.num_waiting),
            "num_waiting_uncached_tokens": int(stats.num_waiting_tokens),
            "num_total_reqs": int(stats.num_running + stats.num_waiting),
            "num_used_tokens": int(used_tokens),
            "max_total_num_tokens": int(total_tokens),
            "max_running_requests": int(stats.max_num_seqs),
            "token_usage": float(stats.kv_usage),
            "gen_throughput": float(self._throughput(stats.num_generated_tokens)),
            "cache_hit_rate": float(stats.prefix_cache_hits / queries) if queries else 0.0,
            "utilization": float(stats.num_running / max(stats.max_num_seqs, 1)),
        }
        timestamp = datetime.now(UTC).isoformat()
        return {"timestamp": timestamp, "dp_rank_count": 1, "loads": [load]}
