"""Requests that enter the engine before their images (the default) answer exactly as with
--no-overlap, the reference: text, one-image and four-image requests at once, twice (the second
time from the prefix cache), over the gRPC, link and shared-memory transports. An image the
encode service refuses after the prompt went in fails only that request and frees its blocks."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from scripts.testkit.launch import start_language
from tests.e2e.conftest import API_KEY, LANGUAGE_ARGS
from tests.e2e.support import data_url, png_bytes, wait_for_idle_kv

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _requests(e2e_model) -> dict[str, list[dict]]:
    images = [png_bytes(64 + 32 * (i % 3), 96 - 16 * (i % 2), seed=i) for i in range(5)]

    def chat(pictures, text):
        parts = [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pictures]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]

    return {
        "text": [{"role": "user", "content": "Name three colours."}],
        "one": chat(images[:1], "What colour is the shape?"),
        "four": chat(images[1:], "How many shapes are there?"),
    }


async def _answers(base_url: str, model: str, requests: dict) -> dict[str, list[int]]:
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=120) as client:

        async def one(messages):
            body = {
                "model": model,
                "messages": messages,
                "max_tokens": 8,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            reply = await client.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["token_ids"]

        answers = await asyncio.gather(*(one(m) for m in requests.values()))
        return dict(zip(requests, answers, strict=True))


@pytest.fixture(scope="module")
def reference(grpc_cluster, e2e_model, tmp_path_factory):
    """The same requests through a --no-overlap language service on the same encode replica."""
    args = ["--encode", grpc_cluster.encode_address, "--no-overlap", *LANGUAGE_ARGS]
    language, base_url, _ = start_language(
        e2e_model.path, tmp_path_factory.mktemp("no_overlap"), args
    )
    try:
        requests = _requests(e2e_model)
        yield asyncio.run(_answers(base_url, grpc_cluster.model_name, requests))
    finally:
        language.stop()


@pytest.mark.parametrize("transport", ["grpc", "nccl", "ipc"])
def test_overlap_answers_equal_no_overlap(request, e2e_model, reference, transport):
    cluster = request.getfixturevalue(f"{transport}_cluster")
    requests = _requests(e2e_model)
    for _ in range(2):  # the second round's prompts come from the prefix cache
        assert asyncio.run(_answers(cluster.base_url, cluster.model_name, requests)) == reference
    wait_for_idle_kv(cluster.base_url)


def test_an_image_refused_after_submission_fails_its_request_and_frees_blocks(grpc_cluster):
    whole = png_bytes(96, 64, seed=7)
    cut = whole[: len(whole) // 2]  # the header reads, the pixels do not decode
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look: " * 40},
                {"type": "image_url", "image_url": {"url": data_url(cut)}},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]
    reply = httpx.post(
        f"{grpc_cluster.base_url}/v1/chat/completions",
        json={"model": grpc_cluster.model_name, "messages": messages, "max_tokens": 4},
        headers=AUTH,
        timeout=60,
    )
    assert reply.status_code == 400, reply.text
    assert "could not be encoded" in reply.json()["error"]["message"]
    wait_for_idle_kv(grpc_cluster.base_url)
