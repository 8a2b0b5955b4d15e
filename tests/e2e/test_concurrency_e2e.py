"""32 concurrent streaming requests, images and text mixed, each with its own correct answer."""

from __future__ import annotations

import asyncio

from tests.e2e.checks import chat_messages, check_answer

NUM_REQUESTS = 32


async def _stream_one(client, model_name: str, greedy: dict, question: str, image):
    stream = await client.chat.completions.create(
        model=model_name,
        messages=chat_messages(question, image),
        stream=True,
        stream_options={"include_usage": True},
        **greedy,
    )
    text, ids, reason, usage = "", [], None, None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            ids += choice.model_extra.get("token_ids", [])
            reason = choice.finish_reason or reason
    return text, ids, reason, usage


async def _all(cluster, model, cases):
    client = cluster.async_client()
    try:
        jobs = [_stream_one(client, cluster.model_name, model.greedy(), q, i) for i, q in cases]
        return await asyncio.wait_for(asyncio.gather(*jobs), timeout=600)
    finally:
        await client.close()


def test_32_concurrent_streams_mixing_images_and_text(grpc_cluster, e2e_model, reference):
    image_cases = e2e_model.image_cases(NUM_REQUESTS // 2, seed=100)
    text_cases = [(None, f"Tell me about the number {i}.") for i in range(NUM_REQUESTS // 2)]
    cases = [c for pair in zip(image_cases, text_cases, strict=True) for c in pair]
    results = asyncio.run(_all(grpc_cluster, e2e_model, cases))
    assert len(results) == NUM_REQUESTS
    for (image, question), (_text, ids, reason, usage) in zip(cases, results, strict=True):
        images = [image] if image is not None else []
        prompt_ids = reference.prompt_ids(chat_messages(question, image), images)
        assert usage.prompt_tokens == len(prompt_ids)
        assert reason in ("stop", "length") and usage.completion_tokens == len(ids)
        check_answer(reference, e2e_model, question, image, prompt_ids, ids)
