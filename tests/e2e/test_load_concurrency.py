"""1,024 concurrent streaming requests, each with a distinct image (so every one is encoded),
against one language service and two encode replicas on the shipped model: none lost, none
failed, every answer correct.

Correct without 1,024 transformers runs: every image derives from one of a few base images of
the shapes task by flipping the lowest bit of one colour byte of one corner pixel (new bytes,
new content hash, the same picture). Each base image is asked alone first; perturbed copies,
asked one at a time, answer the same (the perturbation does not matter to the model); then
every concurrent answer must equal its base's.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import suppress

import httpx
import pytest

from tests.e2e.load import (
    base_cases,
    chat_body,
    load_cluster,
    perturbed,
    png,
    rss_bytes,
    scrape,
    stream_chat,
    stream_many,
)
from tests.e2e.support import wait_for_idle_kv

NUM_BASES = 8
NUM_REQUESTS = 1024
MODEL = "shapes-vl"
KEY = "load-key"
LANGUAGE_ARGS = [
    "--served-model-name",
    MODEL,
    "--api-key",
    KEY,
    "--max-model-len",
    "2048",
    "--kv-cache-memory",
    "256MiB",
    "--max-num-seqs",
    "64",
]
HEADERS = {"Authorization": f"Bearer {KEY}"}
CACHE_BYTES = 8 * 2**20  # small, so the encode caches fill and evict during the runs
ENCODE_ARGS = ["--cache-memory", "8MiB"]
SOAK_S = 60.0
SOAK_CONCURRENCY = 16  # about the sustained peak (tests/e2e/test_load_overload.py)
SOAK_WARMUP_S = 15.0
# RSS may grow by this much after warm-up: allocator slack and caches that fill to their bounds
RSS_GROWTH_BOUND = 48 * 2**20


@pytest.fixture(scope="module")
def cluster(e2e_model, tmp_path_factory):
    if not e2e_model.trained:
        pytest.skip("needs the trained shapes model (answers must be exact)")
    workdir = tmp_path_factory.mktemp("load_concurrency")
    with load_cluster(e2e_model.path, workdir, 2, LANGUAGE_ARGS, ENCODE_ARGS) as running:
        yield running


@pytest.fixture(scope="module")
def bases():
    return base_cases(NUM_BASES)


def _ask_alone(cluster, question: str, image: bytes) -> str:
    url = f"{cluster.base_url}/v1/chat/completions"
    [result] = asyncio.run(stream_many(url, [chat_body(MODEL, question, image)], HEADERS, 120))
    assert result.ok, result
    return result.text


@pytest.fixture(scope="module")
def base_answers(cluster, bases):
    return [_ask_alone(cluster, question, png(image)) for image, question in bases]


def test_the_perturbation_does_not_change_answers(cluster, bases, base_answers):
    # k far above what the concurrent run uses, so those stay cache misses
    for (image, question), answer in zip(bases, base_answers, strict=True):
        for k in (700, 701, 702):
            assert _ask_alone(cluster, question, perturbed(image, k)) == answer


def test_1024_concurrent_streams_with_distinct_images(cluster, bases, base_answers):
    misses_before = sum(
        scrape(url)["splitvl_encode_cache_misses_total"] for url in cluster.encode_metrics_urls
    )
    cases = [(i % NUM_BASES, i // NUM_BASES) for i in range(NUM_REQUESTS)]
    bodies = [chat_body(MODEL, bases[b][1], perturbed(bases[b][0], k)) for b, k in cases]
    assert (
        len({body["messages"][0]["content"][0]["image_url"]["url"] for body in bodies})
        == NUM_REQUESTS
    )
    start = time.monotonic()
    results = asyncio.run(
        stream_many(f"{cluster.base_url}/v1/chat/completions", bodies, HEADERS, timeout_s=500)
    )
    elapsed = time.monotonic() - start

    failed = [(i, r) for i, r in enumerate(results) if not r.ok]
    assert not failed, f"{len(failed)} of {NUM_REQUESTS} failed, e.g. {failed[:3]}"
    wrong = [
        (i, r.text, base_answers[cases[i][0]])
        for i, r in enumerate(results)
        if r.text != base_answers[cases[i][0]]
    ]
    assert not wrong, f"{len(wrong)} answers differ from their base image's, e.g. {wrong[:3]}"
    # Every image went through a vision tower, on both replicas
    misses = [
        scrape(url)["splitvl_encode_cache_misses_total"] for url in cluster.encode_metrics_urls
    ]
    assert sum(misses) - misses_before >= NUM_REQUESTS
    assert all(m > 0 for m in misses)
    wait_for_idle_kv(cluster.base_url)
    print(
        f"{NUM_REQUESTS} concurrent streams: 0 lost, 0 failed, all answers equal their "
        f"base's, {elapsed:.1f} s; encode misses per replica {misses}"
    )
    assert httpx.get(f"{cluster.base_url}/ready", timeout=10).status_code == 200


@pytest.mark.slow
def test_soak_memory_and_state_return_to_idle(cluster, bases, base_answers):
    """A closed loop of SOAK_CONCURRENCY streams for SOAK_S seconds, every image new, with the
    RSS of every process sampled; afterwards KV blocks, encode queues, calls and links are idle
    and the encode caches within their budget."""
    processes = {
        "language": cluster.language.pid,
        **{f"encode{i}": p.pid for i, p in enumerate(cluster.encodes)},
    }
    samples: list[tuple[float, dict[str, int]]] = []
    counts = {"ok": 0, "failed": 0, "wrong": 0}
    start = time.monotonic()

    async def sampler(stop: asyncio.Event) -> None:
        while not stop.is_set():
            samples.append(
                (
                    time.monotonic() - start,
                    {name: rss_bytes(pid) for name, pid in processes.items()},
                )
            )
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)

    async def worker(client, index: int) -> None:
        k = 128 + index  # distinct from every image sent before, and across workers
        while time.monotonic() - start < SOAK_S:
            base = k % NUM_BASES
            image, question = bases[base]
            body = chat_body(MODEL, question, perturbed(image, (k // NUM_BASES) % 768))
            result = await stream_chat(
                client, f"{cluster.base_url}/v1/chat/completions", body, HEADERS
            )
            counts["ok" if result.ok else "failed"] += 1
            counts["wrong"] += result.ok and result.text != base_answers[base]
            k += SOAK_CONCURRENCY

    async def run() -> None:
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler(stop))
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            await asyncio.gather(*(worker(client, i) for i in range(SOAK_CONCURRENCY)))
        wait_for_idle_kv(cluster.base_url, timeout_s=30)
        await asyncio.sleep(1.0)
        stop.set()
        await sampling

    asyncio.run(run())
    elapsed = time.monotonic() - start
    assert counts["failed"] == 0 and counts["wrong"] == 0, counts
    warm = next(rss for t, rss in samples if t >= SOAK_WARMUP_S)
    end = samples[-1][1]
    report = ", ".join(
        f"{name} {warm[name] / 2**20:.0f} -> {end[name] / 2**20:.0f} MiB" for name in processes
    )
    print(
        f"soak: {counts['ok']} requests in {elapsed:.0f} s ({counts['ok'] / elapsed:.1f} "
        f"req/s at {SOAK_CONCURRENCY} concurrent); RSS after warm-up -> end: {report}"
    )
    for name in processes:
        assert end[name] - warm[name] <= RSS_GROWTH_BOUND, f"{name} grew: {report}"
    for url in cluster.encode_metrics_urls:
        metrics = scrape(url)
        assert metrics["splitvl_encode_inflight_requests"] == 0
        assert metrics["splitvl_encode_queue_depth"] == 0
        assert 0 < metrics["splitvl_encode_cache_bytes"] <= CACHE_BYTES
        assert metrics["splitvl_encode_links"] == 0  # inline transport: no link was opened
        assert metrics.get("splitvl_encode_pending_tickets", 0) == 0
