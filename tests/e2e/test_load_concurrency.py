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

import httpx
import pytest

from tests.e2e.load import base_cases, chat_body, load_cluster, perturbed, png, scrape, stream_many
from tests.e2e.support import wait_for_idle_kv

NUM_BASES = 8
NUM_REQUESTS = 1024
MODEL = "shapes-vl"
KEY = "load-key"
LANGUAGE_ARGS = ["--served-model-name", MODEL, "--api-key", KEY, "--max-model-len", "2048",
                 "--kv-cache-memory", "256MiB", "--max-num-seqs", "64"]  # fmt: skip
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def cluster(e2e_model, tmp_path_factory):
    if not e2e_model.trained:
        pytest.skip("needs the trained shapes model (answers must be exact)")
    workdir = tmp_path_factory.mktemp("load_concurrency")
    with load_cluster(e2e_model.path, workdir, 2, LANGUAGE_ARGS) as running:
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
    misses_before = sum(scrape(url)["splitvl_encode_cache_misses_total"]
                        for url in cluster.encode_metrics_urls)  # fmt: skip
    cases = [(i % NUM_BASES, i // NUM_BASES) for i in range(NUM_REQUESTS)]
    bodies = [chat_body(MODEL, bases[b][1], perturbed(bases[b][0], k)) for b, k in cases]
    assert len({body["messages"][0]["content"][0]["image_url"]["url"] for body in bodies}) == \
        NUM_REQUESTS  # fmt: skip
    start = time.monotonic()
    results = asyncio.run(stream_many(f"{cluster.base_url}/v1/chat/completions", bodies,
                                      HEADERS, timeout_s=500))  # fmt: skip
    elapsed = time.monotonic() - start

    failed = [(i, r) for i, r in enumerate(results) if not r.ok]
    assert not failed, f"{len(failed)} of {NUM_REQUESTS} failed, e.g. {failed[:3]}"
    wrong = [(i, r.text, base_answers[cases[i][0]]) for i, r in enumerate(results)
             if r.text != base_answers[cases[i][0]]]  # fmt: skip
    assert not wrong, f"{len(wrong)} answers differ from their base image's, e.g. {wrong[:3]}"
    # Every image went through a vision tower, on both replicas
    misses = [scrape(url)["splitvl_encode_cache_misses_total"]
              for url in cluster.encode_metrics_urls]  # fmt: skip
    assert sum(misses) - misses_before >= NUM_REQUESTS
    assert all(m > 0 for m in misses)
    wait_for_idle_kv(cluster.base_url)
    print(f"{NUM_REQUESTS} concurrent streams: 0 lost, 0 failed, all answers equal their "
          f"base's, {elapsed:.1f} s; encode misses per replica {misses}")
    assert httpx.get(f"{cluster.base_url}/ready", timeout=10).status_code == 200
