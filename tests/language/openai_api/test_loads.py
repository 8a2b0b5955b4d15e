"""GET /v1/loads: the load report the SGLang gateway's load-aware policies poll, with every count
an integer (the gateway stops polling a replica whose report does not parse)."""

from __future__ import annotations

import threading
import time
import types

import httpx

from services.language.frontend.loads import LoadReporter
from tests.language.serving import SHAPES_VL, chat_server

INT_FIELDS = (
    "dp_rank",
    "num_running_reqs",
    "num_waiting_reqs",
    "num_waiting_uncached_tokens",
    "num_total_reqs",
    "num_used_tokens",
    "max_total_num_tokens",
    "max_running_requests",
)
FLOAT_FIELDS = ("token_usage", "gen_throughput", "cache_hit_rate", "utilization")


def _stats(**changes):
    base = dict(
        num_running=0,
        num_waiting=0,
        num_free_blocks=10,
        num_total_blocks=10,
        kv_usage=0.0,
        prefix_cache_queries=0,
        prefix_cache_hits=0,
        num_preemptions=0,
        num_waiting_tokens=0,
        num_generated_tokens=0,
        block_size=16,
        max_num_seqs=8,
    )
    return types.SimpleNamespace(**{**base, **changes})


def test_the_report_measures_throughput_between_polls():
    now = [100.0]
    engine = types.SimpleNamespace(stats=lambda: current)
    reporter = LoadReporter(engine, clock=lambda: now[0])
    current = _stats(num_generated_tokens=50)
    assert reporter.report()["loads"][0]["gen_throughput"] == 0.0  # no window yet
    now[0], current = (
        102.0,
        _stats(num_generated_tokens=450, num_running=3, num_waiting=2, num_free_blocks=4),
    )
    load = reporter.report()["loads"][0]
    assert load["gen_throughput"] == 200.0
    assert (load["num_running_reqs"], load["num_waiting_reqs"], load["num_total_reqs"]) == (3, 2, 5)
    assert (load["num_used_tokens"], load["max_total_num_tokens"]) == (96, 160)
    assert load["utilization"] == 3 / 8


def test_the_route_reports_a_running_request_with_integer_counts():
    with chat_server(SHAPES_VL) as server:
        url = f"{server.base_url}/v1/loads"
        idle = httpx.get(url, timeout=10).json()
        assert idle["dp_rank_count"] == 1 and len(idle["loads"]) == 1
        load = idle["loads"][0]
        for name in INT_FIELDS:
            assert type(load[name]) is int, name
        for name in FLOAT_FIELDS:
            assert type(load[name]) is float, name
        assert load["num_running_reqs"] == 0 and load["max_total_num_tokens"] > 0

        body = {
            "model": "shapes-vl",
            "messages": [{"role": "user", "content": "Count to a thousand."}],
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        seen: list[int] = []
        rates: list[float] = []

        def stream() -> None:
            with httpx.stream(
                "POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=120
            ) as response:
                for _ in response.iter_lines():
                    pass

        thread = threading.Thread(target=stream)
        thread.start()
        deadline = time.monotonic() + 30
        while thread.is_alive() and time.monotonic() < deadline:
            load = httpx.get(url, timeout=10).json()["loads"][0]
            seen.append(load["num_running_reqs"])
            rates.append(load["gen_throughput"])
            time.sleep(0.2)
        thread.join(60)
        assert 1 in seen
        time.sleep(1.1)  # a rate window closes: it holds the stream's tokens if none closed yet
        after = httpx.get(url, timeout=10).json()["loads"][0]
        assert after["num_running_reqs"] == 0
        assert max(rates + [after["gen_throughput"]]) > 0
