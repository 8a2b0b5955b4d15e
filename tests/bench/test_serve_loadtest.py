"""The serving load generator: metric math, arrivals, datasets, and runs against real servers."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bench.serve.cli import main
from bench.serve.client import RequestResult, sse_events
from bench.serve.datasets import (
    DatasetError,
    RandomSpec,
    parse_buckets,
    parse_count_range,
    random_requests,
)
from bench.serve.metrics import (
    compute_metrics,
    meets_slos,
    parse_goodput,
    percentile,
    timeline,
    tpot,
)
from bench.serve.runner import arrival_offsets
from bench.serve.server_metrics import Scrape, parse_samples
from tests.bench.conftest import FAKE_MODES, REPO

RESULT_KEYS = (
    "date",
    "backend",
    "model_id",
    "num_prompts",
    "request_rate",
    "burstiness",
    "max_concurrency",
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    "errors",
    "requests",
    "server_metrics",
)


def _result(index=0, ttft=0.1, e2el=1.0, tokens=10, itl=(), success=True, start=0.0, error=""):
    return RequestResult(
        index=index,
        start=start,
        success=success,
        ttft=ttft,
        e2el=e2el,
        itl=list(itl),
        output_tokens=tokens,
        prompt_tokens=4,
        usage_reported=True,
        error=error,
    )


# --- metric math ---------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy_and_is_zero_when_empty():
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([], 99) == 0.0


def test_tpot_excludes_the_first_token():
    assert tpot(_result(ttft=0.1, e2el=1.0, tokens=10)) == pytest.approx(0.1)
    assert tpot(_result(tokens=1)) is None


def test_compute_metrics_on_hand_made_timings():
    results = [
        _result(0, ttft=0.1, e2el=1.0, tokens=10, itl=[0.1] * 9),
        _result(1, ttft=0.3, e2el=2.3, tokens=11, itl=[0.2] * 10),
        _result(2, ttft=0.0, e2el=0.5, tokens=0, success=False, error="HTTP 500: boom"),
    ]
    m = compute_metrics(results, duration=4.0, slos={"ttft": 200}, percentiles=(50, 99))
    assert (m["completed"], m["failed"]) == (2, 1)
    assert m["total_output_tokens"] == 21 and m["total_input_tokens"] == 8
    assert m["request_throughput"] == pytest.approx(0.5)
    assert m["output_throughput"] == pytest.approx(21 / 4)
    assert m["total_token_throughput"] == pytest.approx(29 / 4)
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(150.0)  # (0.9/9 + 2.0/10) / 2
    assert m["mean_itl_ms"] == pytest.approx((0.9 + 2.0) / 19 * 1000)  # gaps pooled
    assert m["p99_e2el_ms"] == pytest.approx(np.percentile([1000, 2300], 99))
    assert m["request_goodput"] == pytest.approx(0.25)  # only the first meets ttft <= 200 ms


def test_goodput_slos():
    r = _result(ttft=0.1, e2el=1.0, tokens=10)  # TPOT 100 ms
    assert meets_slos(r, {"ttft": 100, "tpot": 100, "e2el": 1000})
    assert not meets_slos(r, {"tpot": 99})
    assert meets_slos(_result(tokens=1), {"tpot": 0})  # one token: TPOT counts as 0
    assert not meets_slos(_result(success=False), {})
    assert parse_goodput(["ttft:500", "E2EL:2000"]) == {"ttft": 500.0, "e2el": 2000.0}
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["tpot:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_timeline_adds_up_to_the_output_tokens():
    r = _result(start=0.0, e2el=2.5, tokens=6)
    r.chunk_times = [0.5, 0.9, 1.2, 1.4, 2.1, 2.4]
    line = timeline([r], duration=2.5, bin_s=1.0)
    assert line.output_tokens_per_s == [2.0, 2.0, 2.0]
    assert line.in_flight == pytest.approx([1.0, 1.0, 0.5])


# --- arrivals ------------------------------------------------------------------------------


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_arrivals_have_mean_gap_one_over_rate(burstiness):
    offsets = arrival_offsets(20000, request_rate=50.0, burstiness=burstiness, seed=7)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03)
    # A gamma with shape k has coefficient of variation 1/sqrt(k): 1 for Poisson
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.05)
    assert offsets == arrival_offsets(20000, 50.0, burstiness, seed=7)


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(5, float("inf")) == [0.0] * 5


# --- parsing and datasets ------------------------------------------------------------------


def test_sse_events_join_data_lines_and_skip_comments():
    lines = [
        ": keep-alive",
        'data: {"a":',
        "data: 1}",
        "",
        "event: error",
        "data: x",
        "",
        "data: [DONE]",
    ]

    async def collect():
        async def gen():
            for line in lines:
                yield line

        return [pair async for pair in sse_events(gen())]

    assert asyncio.run(collect()) == [("", '{"a":\n1}'), ("error", "x"), ("", "[DONE]")]


def test_bucket_and_count_parsing():
    buckets = parse_buckets("64x64:0.5, 96x64:1.5")
    assert buckets.sizes == ((64, 64), (96, 64)) and buckets.weights == (0.5, 1.5)
    assert parse_count_range("2") == (2, 2) and parse_count_range("1-3") == (1, 3)
    for bad in ("64x:1", "axb:1", "64x64:-1", "64x64:0", ""):
        with pytest.raises(DatasetError):
            parse_buckets(bad)
    with pytest.raises(DatasetError):
        parse_count_range("3-1")


def test_random_mm_images_sizes_and_repeats():
    import base64
    import io

    from PIL import Image

    buckets = parse_buckets("64x64:1,96x64:1")
    spec = RandomSpec(
        20, input_len=8, output_len=4, num_images=(1, 2), buckets=buckets, image_repeat_ratio=0.25
    )
    requests = random_requests(spec, seed=3)
    assert requests == random_requests(spec, seed=3)
    seen: set[int] = set()
    num_reusing = 0
    for r in requests:
        parts = r.messages[0]["content"]
        urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        assert len(urls) == r.num_images and 1 <= r.num_images <= 2
        assert len(parts[-1]["text"].split()) == r.prompt_len_estimate
        num_reusing += all(k in seen for k in r.image_keys)
        seen.update(r.image_keys)
        image = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
        assert image.format == "PNG" and image.size in ((64, 64), (96, 64))
    assert num_reusing == 5


def test_random_video_clips_are_real_distinct_videos():
    import base64

    from bench.serve.videos import VideoSpec, parse_video_size
    from shared.model.video_decode import probe

    spec = RandomSpec(3, input_len=6, output_len=4, video=VideoSpec(64, 48, 2.0, 6.0))
    requests = random_requests(spec, seed=2)
    assert requests == random_requests(spec, seed=2)
    urls = [r.messages[0]["content"][0]["video_url"]["url"] for r in requests]
    assert len(set(urls)) == 3 and all(u.startswith("data:video/mp4;base64,") for u in urls)
    meta = probe(base64.b64decode(urls[0].split(",", 1)[1]))
    assert (meta.width, meta.height, meta.num_frames, meta.fps) == (64, 48, 12, 6.0)
    assert parse_video_size("320x240") == (320, 240)
    for bad in ("320", "1x1", "ax2"):
        with pytest.raises(DatasetError):
            parse_video_size(bad)
    with pytest.raises(DatasetError, match="even"):
        VideoSpec(65, 48)


def test_video_load_run_against_splitvl(bench_cluster, tmp_path, capsys):
    rc = main(
        [
            "--base-url",
            bench_cluster.base_url,
            "--api-key",
            bench_cluster.api_key,
            "--dataset-name",
            "random-video",
            "--num-prompts",
            "6",
            "--max-concurrency",
            "3",
            "--random-input-len",
            "8",
            "--random-output-len",
            "6",
            "--random-video-size",
            "96x64",
            "--random-video-seconds",
            "2",
            "--ignore-eos",
            "--disable-tqdm",
            "--save-result",
            "--result-dir",
            str(tmp_path),
            "--result-filename",
            "video.json",
        ]
    )
    assert rc == 0, capsys.readouterr()
    result = json.loads((tmp_path / "video.json").read_text())
    assert (result["completed"], result["failed"]) == (6, 0)
    assert all(r["prompt_tokens"] > 20 for r in result["requests"])  # the clips' tokens


# --- server metrics ------------------------------------------------------------------------


def test_server_metrics_report_run_deltas():
    from bench.serve.server_metrics import MetricsScraper

    registry = CollectorRegistry()
    hits = Counter("splitvl_encode_cache_hits", "h", registry=registry)
    misses = Counter("splitvl_encode_cache_misses", "m", registry=registry)
    depth = Gauge("splitvl_encode_queue_depth", "d", registry=registry)
    latency = Histogram("splitvl_encode_request_latency_seconds", "l", registry=registry)
    hits.inc(10)  # before the run: must not count
    latency.observe(5.0)
    scraper = MetricsScraper(["u"], client=None)
    snapshot = lambda during: parse_samples(generate_latest(registry).decode())  # noqa: E731
    scraper.scrapes.append(Scrape(1, 0.0, "u", snapshot(False), during_run=False))
    hits.inc(3)
    misses.inc(1)
    depth.set(4)
    latency.observe(0.1)
    latency.observe(0.3)
    scraper.scrapes.append(Scrape(2, 1.0, "u", snapshot(True)))
    depth.set(0)
    scraper.scrapes.append(Scrape(3, 2.0, "u", snapshot(False), during_run=False))
    summary = scraper.summary()
    assert summary["encode_cache_hit_ratio"] == pytest.approx(0.75)
    assert summary["encode_request_latency_mean_ms"] == pytest.approx(200.0)
    assert summary["encode_queue_depth"] == {"max": 4.0, "mean": 4.0}  # idle scrapes left out
    assert summary["kv_cache_usage_ratio"] is None
    assert summary["requests_per_replica"] is None  # no router scraped


def test_requests_per_replica_come_from_the_routers_metrics():
    from bench.serve.report import format_server_metrics
    from bench.serve.server_metrics import MetricsScraper

    def router(a: int, b: int) -> str:
        return (
            "# TYPE smg_worker_requests_total counter\n"
            f'smg_worker_requests_total{{worker="http://language-0:8000",model="m"}} {a}\n'
            f'smg_worker_requests_total{{worker="http://language-1:8000",model="m"}} {b}\n'
        )

    scraper = MetricsScraper(["r"], client=None)
    scraper.scrapes.append(Scrape(1, 0.0, "r", parse_samples(router(5, 1)), during_run=False))
    scraper.scrapes.append(Scrape(2, 1.0, "r", parse_samples(router(12, 9)), during_run=False))
    summary = scraper.summary()
    assert summary["requests_per_replica"] == {
        "http://language-0:8000": 7.0,
        "http://language-1:8000": 8.0,
    }
    assert "Requests to http://language-1:8000:" in format_server_metrics(summary)


# --- command line --------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.serve", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bad_arguments_and_unreachable_server_give_one_line_errors():
    bad = _cli("--goodput", "latency:5")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].endswith("e.g. ttft:500")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = _cli("--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "1")
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert "cannot reach the server" in down.stderr


# --- runs ----------------------------------------------------------------------------------


def test_failures_are_counted_with_their_messages(fake_server, tmp_path):
    modes = list(FAKE_MODES)
    dataset = tmp_path / "requests.jsonl"
    dataset.write_text(
        "".join(json.dumps({"prompt": f"please {m}", "max_tokens": 4}) + "\n" for m in modes)
    )
    rc = main(
        [
            "--base-url",
            fake_server,
            "--dataset-name",
            "jsonl",
            "--dataset-path",
            str(dataset),
            "--num-prompts",
            str(2 * len(modes)),
            "--max-concurrency",
            "3",
            "--disable-tqdm",
            "--timeout",
            "30",
            "--save-result",
            "--result-dir",
            str(tmp_path),
            "--result-filename",
            "fake.json",
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "fake.json").read_text())
    assert result["model_id"] == "fake-model"
    assert (result["completed"], result["failed"]) == (2, 8)
    for row in result["requests"]:
        mode = modes[row["index"] % len(modes)]
        assert row["success"] == (mode == "ok"), row
        if FAKE_MODES[mode]:
            assert FAKE_MODES[mode] in row["error"]
    errors = [e for e in result["errors"] if e]
    assert sum("HTTP 500: the fake server is on fire" == e for e in errors) == 2
    assert sum(e.startswith("connection error: RemoteProtocolError") for e in errors) == 2
    assert result["total_output_tokens"] == 2 * 3  # the usage chunk's count


def test_load_run_against_splitvl(bench_cluster, tmp_path, capsys):
    plot = tmp_path / "run.png"
    rc = main(
        [
            "--base-url",
            bench_cluster.base_url,
            "--api-key",
            bench_cluster.api_key,
            "--dataset-name",
            "random-mm",
            "--num-prompts",
            "32",
            "--max-concurrency",
            "8",
            "--random-input-len",
            "24",
            "--random-output-len",
            "12",
            "--random-range-ratio",
            "0.33",
            "--random-mm-bucket-config",
            "64x64:1,96x64:1",
            "--image-repeat-ratio",
            "0.25",
            "--ignore-eos",
            "--seed",
            "1",
            "--timeout",
            "60",
            "--goodput",
            "ttft:60000",
            "--disable-tqdm",
            "--plot",
            str(plot),
            "--metrics-url",
            bench_cluster.language_metrics_url,
            "--metrics-url",
            bench_cluster.encode_metrics_url,
            "--metrics-interval",
            "0.5",
            "--save-result",
            "--result-dir",
            str(tmp_path),
            "--result-filename",
            "run.json",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    assert "Serving Benchmark Result" in printed and "Encode cache hit ratio" in printed
    result = json.loads((tmp_path / "run.json").read_text())
    missing = [key for key in RESULT_KEYS if key not in result]
    assert not missing
    for stat in ("mean", "median", "std", "p90", "p99"):
        for metric in ("ttft", "tpot", "itl", "e2el"):
            assert result[f"{stat}_{metric}_ms"] >= 0
    assert (result["completed"], result["failed"]) == (32, 0)
    assert result["num_prompts"] == 32 and result["max_concurrency"] == 8
    rows = result["requests"]
    assert len(rows) == 32 and all(r["ttft_s"] <= r["e2el_s"] for r in rows)
    assert all(8 <= r["output_tokens"] <= 16 for r in rows)  # ignore_eos: exactly max_tokens
    assert result["total_output_tokens"] == sum(r["output_tokens"] for r in rows)
    assert result["total_input_tokens"] == sum(r["prompt_tokens"] for r in rows) > 0
    assert result["request_throughput"] > 0 and result["output_throughput"] > 0
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert sum(r["num_images"] for r in rows) == 32
    server = result["server_metrics"]
    assert server["num_scrape_errors"] == 0
    assert 0.0 <= server["encode_cache_hit_ratio"] <= 1.0
    assert server["encode_cache_hits"] + server["encode_cache_misses"] > 0
    assert server["kv_cache_usage_ratio"]["max"] >= server["kv_cache_usage_ratio"]["mean"] >= 0
    assert server["num_requests_waiting"] is not None
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
