"""Requests submitted before their images: the engine computes the prompt up to the first
missing image and goes on as each arrives. Greedy tokens equal those of the same requests with
their images from the start (the reference path), with the prefix cache on, several at once; a
request whose image fails or does not fit its placeholder ends with the error and frees its
blocks, and one cancelled while waiting frees them too."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from services.language.engine import AsyncEngine, EngineConfig
from services.language.engine.request import GenerationRequest, InvalidRequestError
from shared.wire.images import PendingImage
from tests.language.conftest import collect, greedy_request, make_prompt_case

MAX_TOKENS = 6
CONFIG = EngineConfig(kv_cache_memory=1 << 22, block_size=4, max_num_batched_tokens=24)


def _pending(request: GenerationRequest) -> GenerationRequest:
    images = tuple(PendingImage(i.grid_thw, i.num_tokens, i.content_hash) for i in request.images)
    return GenerationRequest(
        request.request_id, request.prompt_token_ids, images, request.sampling, 0.0
    )


def _cases(vision):
    return {
        "one": make_prompt_case(vision, [9, 4], [(128, 96)], seed=1),
        "four": make_prompt_case(
            vision, [5, 3, 6, 2, 4], [(64, 64), (96, 64), (64, 128), (64, 64)], seed=2
        ),
        "text": make_prompt_case(vision, [14], [], seed=3),
    }


async def _serve(engine, requests, delays: dict[str, list[float]]):
    """Submit pending requests, then hand each image over after its delay (in seconds)."""

    async def feed(request, originals):
        for index, delay in sorted(enumerate(delays[request.request_id]), key=lambda x: x[1]):
            await asyncio.sleep(delay)
            engine.provide_images(request.request_id, [(index, originals[index])])

    pending = [_pending(r) for r in requests]
    feeders = [
        asyncio.ensure_future(feed(p, r.images)) for p, r in zip(pending, requests, strict=True)
    ]
    outputs = await collect(engine, pending)
    await asyncio.gather(*feeders)
    return outputs


def _tokens(outputs):
    return {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in outputs.items()}


# 0: every piece before a missing image runs as soon as it can, alone in a step if need be
@pytest.mark.parametrize("min_lone_piece", [0, CONFIG.min_lone_piece])
def test_pending_images_give_the_tokens_of_ready_ones(
    tiny_vision, tiny_vl_model_dir, min_lone_piece
):
    cases = _cases(tiny_vision)
    requests = [greedy_request(rid, case, MAX_TOKENS) for rid, case in cases.items()]
    # Images arrive out of order, the last one well after the text before it was computed
    delays = {"one": [0.3], "four": [0.05, 0.4, 0.0, 0.2], "text": []}

    async def main():
        config = dataclasses.replace(CONFIG, min_lone_piece=min_lone_piece)
        engine = AsyncEngine.from_model_dir(tiny_vl_model_dir, config)
        await engine.start()
        try:
            reference = await collect(engine, requests)
            waited = await _serve(engine, requests, delays)
            again = await _serve(engine, requests, delays)  # the prefix cache now holds them
            return reference, waited, again, engine.stats()
        finally:
            await engine.shutdown()

    reference, waited, again, stats = asyncio.run(main())
    assert _tokens(waited) == _tokens(reference)
    assert _tokens(again) == _tokens(reference)
    assert again["four"][-1].num_cached_tokens > 0
    assert stats.num_free_blocks == stats.num_total_blocks


def test_failed_mismatched_and_cancelled_requests_free_their_blocks(tiny_vision, tiny_vl_model_dir):
    case = _cases(tiny_vision)["four"]

    async def main():
        engine = AsyncEngine.from_model_dir(tiny_vl_model_dir, CONFIG)
        await engine.start()
        try:
            before = engine.stats().num_free_blocks
            failing = _pending(greedy_request("failing", case, MAX_TOKENS))
            stream = engine.generate(failing)
            engine.provide_images("failing", [(0, case.images[0])])
            await asyncio.sleep(0.2)  # the text before image 1 is computed meanwhile
            engine.fail_request("failing", RuntimeError("the encode service is down"))
            with pytest.raises(RuntimeError, match="encode service is down"):
                [out async for out in stream]

            mismatched = _pending(greedy_request("mismatched", case, MAX_TOKENS))
            stream = engine.generate(mismatched)
            engine.provide_images("mismatched", [(0, case.images[1])])  # another grid
            with pytest.raises(InvalidRequestError, match="laid out for"):
                [out async for out in stream]

            cancelled = _pending(greedy_request("cancelled", case, MAX_TOKENS))
            stream = engine.generate(cancelled)
            await asyncio.sleep(0.2)
            await stream.aclose()
            await engine.abort("cancelled")
            # A late image for a request that is gone changes nothing
            engine.provide_images("cancelled", [(0, case.images[0])])
            await asyncio.sleep(0.1)
            return before, engine.stats()
        finally:
            await engine.shutdown()

    before, after = asyncio.run(main())
    assert after.num_free_blocks == before == after.num_total_blocks
    assert after.num_running == after.num_waiting == 0
