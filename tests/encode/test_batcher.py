"""VisionBatcher with the real tiny vision tower: batching, correctness, limits, deadlines."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.encode.batcher import (
    BatcherClosedError,
    DeadlineExpiredError,
    VisionBatcher,
    VisionQueueFullError,
)
from tests.encode.helpers import png_bytes

SIZES = [(64, 48), (200, 100), (32, 32), (256, 256), (100, 300), (90, 60), (48, 160), (128, 96)]


@pytest.fixture(scope="module")
def images(reference):
    """16 preprocessed images of mixed sizes and their solo (unbatched) embeddings."""
    out = []
    for i in range(16):
        w, h = SIZES[i % len(SIZES)]
        data = png_bytes(w, h, seed=1000 + i)
        pixel_values, grid = reference.preprocess(data)
        with torch.inference_mode():
            solo = reference.model(pixel_values, torch.tensor([grid]))
        out.append((pixel_values, grid, solo))
    return out


def _batcher(reference, batches, **kw) -> VisionBatcher:
    def forward(pixel_values, grid_thw):
        batches.append(grid_thw.shape[0])
        return reference.model(pixel_values, grid_thw)

    defaults = dict(merge_size=2, max_batch_patches=100_000, max_queue_images=64)
    return VisionBatcher(forward, **{**defaults, **kw})


def test_concurrent_images_batch_and_match_unbatched(reference, images):
    batches: list[int] = []

    async def run():
        batcher = _batcher(reference, batches)
        batcher.start()
        try:
            futures = [batcher.submit(pv, grid) for pv, grid, _ in images]
            return await asyncio.wait_for(asyncio.gather(*futures), 60)
        finally:
            await batcher.close()

    outputs = asyncio.run(run())
    assert batches == [16]  # all queued before the loop ran: one forward
    for out, (_, grid, solo) in zip(outputs, images, strict=True):
        assert out.shape == solo.shape == (grid[1] * grid[2] // 4, 3 * 64)
        torch.testing.assert_close(out, solo, rtol=0, atol=1e-5)


def test_batches_are_bounded_by_patches(reference, images):
    batches: list[int] = []
    limit = 600

    async def run():
        batcher = _batcher(reference, batches, max_batch_patches=limit)
        batcher.start()
        try:
            futures = [batcher.submit(pv, grid) for pv, grid, _ in images]
            return await asyncio.wait_for(asyncio.gather(*futures), 60)
        finally:
            await batcher.close()

    outputs = asyncio.run(run())
    patches = [pv.shape[0] for pv, _, _ in images]
    assert sum(batches) == 16 and len(batches) > 1
    start = 0
    for size in batches:  # FIFO: each batch is the next run of images
        in_batch = patches[start : start + size]
        assert size == 1 or sum(in_batch) <= limit
        start += size
    for out, (_, _, solo) in zip(outputs, images, strict=True):
        torch.testing.assert_close(out, solo, rtol=0, atol=1e-5)


def test_full_queue_expired_and_cancelled_images(reference, images):
    batches: list[int] = []
    pv, grid, solo = images[0]

    async def run():
        batcher = _batcher(reference, batches, max_queue_images=3)
        loop = asyncio.get_running_loop()
        expired = batcher.submit(pv, grid, deadline=loop.time() - 1)
        cancelled = batcher.submit(pv, grid)
        kept = batcher.submit(pv, grid, deadline=loop.time() + 60)
        with pytest.raises(VisionQueueFullError, match="full"):
            batcher.submit(pv, grid)
        cancelled.cancel()
        batcher.start()  # the loop starts only now, with all three queued
        try:
            result = await asyncio.wait_for(kept, 60)
            with pytest.raises(DeadlineExpiredError):
                await expired
        finally:
            await batcher.close()
        with pytest.raises(BatcherClosedError):
            batcher.submit(pv, grid)
        return result

    result = asyncio.run(run())
    assert batches == [1]  # only the live image ran
    assert torch.equal(result, solo)


def test_batch_wait_collects_images_arriving_later(reference, images):
    batches: list[int] = []

    async def run():
        batcher = _batcher(reference, batches, batch_wait_s=0.5)
        batcher.start()
        try:
            first = batcher.submit(*images[0][:2])
            await asyncio.sleep(0.05)  # the loop is holding the partial batch open
            second = batcher.submit(*images[1][:2])
            return await asyncio.wait_for(asyncio.gather(first, second), 60)
        finally:
            await batcher.close()

    asyncio.run(run())
    assert batches == [2]
