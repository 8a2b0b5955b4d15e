"""The language service on two tensor- or expert-parallel ranks (worker processes over gloo):
the same greedy answers as one rank over both transports, concurrent streams, and a worker that
dies mid-stream turns into an error event, a 503 health check and an exit, never a hang."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from scripts.testkit.launch import start_language
from tests.e2e.checks import chat_messages
from tests.e2e.conftest import LANGUAGE_ARGS, Cluster

VARIANTS = {
    "tp2-grpc": ["-tp", "2", "--transport", "grpc"],
    "tp2-nccl": ["-tp", "2", "--transport", "nccl"],
    "ep2-grpc": ["-tp", "2", "--enable-expert-parallel", "--transport", "grpc"],
    "ep2-nccl": ["-tp", "2", "--enable-expert-parallel", "--transport", "nccl"],
}


def _questions(model, images: list[bytes]) -> list[list[dict]]:
    """Text only, one image, two images in one message."""
    two = chat_messages("Which shape is larger?", images[1])
    two[0]["content"].insert(0, chat_messages("", images[2])[0]["content"][0])
    return [
        chat_messages("Hello there! How many shapes?"),
        chat_messages("What colour is it?", images[0]),
        two,
    ]


def _answers(cluster: Cluster, model, questions) -> list[list[int]]:
    client = cluster.client()
    out = []
    for messages in questions:
        response = client.chat.completions.create(
            model=cluster.model_name, messages=messages, **model.greedy()
        )
        out.append(response.choices[0].model_extra["token_ids"])
    return out


@pytest.fixture(scope="module")
def encode_address(grpc_cluster):
    """The one-rank cluster's encode replica serves the parallel language services too."""
    return grpc_cluster.encode_address


def _language(model_path: Path, workdir: Path, address: str, extra: list[str]):
    args = ["--encode", address, *LANGUAGE_ARGS, *extra]
    proc, base_url, grpc = start_language(model_path, workdir, args)
    return proc, Cluster(base_url, grpc, address, logs=[proc.log_path])


@pytest.fixture(scope="module")
def questions(e2e_model):
    images = [image for image, _ in e2e_model.image_cases(3, seed=70)]
    return _questions(e2e_model, images)


@pytest.fixture(scope="module")
def one_rank_answers(grpc_cluster, e2e_model, questions):
    return _answers(grpc_cluster, e2e_model, questions)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_answer_like_one(
    e2e_model, encode_address, questions, one_rank_answers, variant, tmp_path
):
    proc, cluster = _language(e2e_model.path, tmp_path, encode_address, VARIANTS[variant])
    try:
        assert _answers(cluster, e2e_model, questions) == one_rank_answers
        if variant == "tp2-grpc":
            _sixteen_concurrent_streams(cluster, e2e_model, questions, one_rank_answers)
    finally:
        assert proc.stop() in (0, -signal.SIGTERM)
    assert _children(proc.pid) == []


def _sixteen_concurrent_streams(cluster, model, questions, expected) -> None:
    async def one(client, messages):
        stream = await client.chat.completions.create(
            model=cluster.model_name, messages=messages, stream=True, **model.greedy()
        )
        ids = []
        async for chunk in stream:
            for choice in chunk.choices:
                ids += choice.model_extra.get("token_ids", [])
        return ids

    async def run():
        client = cluster.async_client()
        try:
            jobs = [one(client, questions[i % 3]) for i in range(16)]
            return await asyncio.wait_for(asyncio.gather(*jobs), 300)
        finally:
            await client.close()

    for i, ids in enumerate(asyncio.run(run())):
        assert ids == expected[i % 3]


def _children(pid: int) -> list[int]:
    """Live child processes of `pid` (Linux /proc)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        children += [int(c) for c in task.read_text().split()]
    return [c for c in children if Path(f"/proc/{c}").exists()]


def _workers(pid: int) -> list[int]:
    """The spawned worker ranks among the children (not multiprocessing's resource tracker)."""
    return [c for c in _children(pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_a_dead_worker_ends_streams_with_an_error_and_the_service_exits(
    e2e_model, encode_address, tmp_path
):
    proc, cluster = _language(e2e_model.path, tmp_path, encode_address, VARIANTS["tp2-grpc"])
    try:
        [worker] = _workers(proc.pid)
        body = {
            "model": cluster.model_name,
            "stream": True,
            "max_tokens": 1500,
            "ignore_eos": True,
            "messages": chat_messages("Count to a thousand."),
        }
        headers = {"Authorization": f"Bearer {cluster.api_key}"}
        events, killed_at = [], None
        with httpx.stream(
            "POST",
            f"{cluster.base_url}/v1/chat/completions",
            json=body,
            headers=headers,
            timeout=180,
        ) as response:
            for line in response.iter_lines():
                if line:  # events are separated by blank lines
                    events.append(line)
                if len(events) == 8 and killed_at is None:
                    os.kill(worker, signal.SIGKILL)
                    killed_at = time.monotonic()
        assert killed_at is not None and time.monotonic() - killed_at < 30  # no hang
        errors = [e for e in events if '"error"' in e]
        assert errors and "rank 1" in errors[-1] and events[-1] == "data: [DONE]"
        deadline = time.monotonic() + 5
        while True:
            try:
                health = httpx.get(f"{cluster.base_url}/health", timeout=2)
                if health.status_code == 503:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "health never turned 503"
            time.sleep(0.1)
        assert "rank 1" in health.json()["reason"]
        assert proc.process.wait(30) == 1  # exits on its own for a restart
    finally:
        proc.stop()
    assert _children(proc.pid) == []


def test_an_idle_workers_death_turns_health_503_within_two_seconds(
    e2e_model, encode_address, tmp_path
):
    proc, cluster = _language(e2e_model.path, tmp_path, encode_address, VARIANTS["tp2-grpc"])
    try:
        [worker] = _workers(proc.pid)
        assert httpx.get(f"{cluster.base_url}/health", timeout=5).status_code == 200
        os.kill(worker, signal.SIGKILL)  # no request in flight: nothing steps the engine
        killed_at = time.monotonic()
        while True:
            health = httpx.get(f"{cluster.base_url}/health", timeout=2)
            if health.status_code == 503:
                break
            assert time.monotonic() - killed_at < 2.0, "health stayed 200 after the death"
            time.sleep(0.05)
        assert time.monotonic() - killed_at < 2.0
        assert "rank 1" in health.json()["reason"]
        assert proc.process.wait(30) == 1  # and the service exits for a restart, as when busy
    finally:
        proc.stop()
    assert _children(proc.pid) == []
