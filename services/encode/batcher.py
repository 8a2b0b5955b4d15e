"""Batches the images of concurrent requests into one vision forward, bounded by patches.

Requests submit preprocessed images; one loop takes as many queued images as fit in
`max_batch_patches` (always at least one, so an image larger than the bound runs alone), runs the
tower on a dedicated thread so the event loop keeps serving, and splits the packed output back per
image. While a forward runs, new images queue up and go together into the next one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# (pixel_values [N, patch_dim], grid_thw [num_images, 3] long) -> packed [N / merge^2, (1+k)*H]
ForwardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class VisionQueueFullError(RuntimeError):
    """The vision queue holds its maximum number of images; retry later or on another replica."""


class DeadlineExpiredError(TimeoutError):
    """The request's deadline passed before its image reached the vision tower."""


class BatcherClosedError(RuntimeError):
    """The batcher was shut down before the image was encoded."""


@dataclass(frozen=True)
class BatchStats:
    """What one vision forward did, for metrics and logs."""

    num_images: int
    num_patches: int
    forward_s: float
    max_wait_s: float


@dataclass
class _Pending:
    pixel_values: torch.Tensor  # [num_patches, patch_dim]
    grid_thw: tuple[int, int, int]
    future: asyncio.Future
    deadline: float | None  # event-loop clock
    enqueued_at: float

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w


class VisionBatcher:
    """Queue + loop feeding one vision tower; create and use it inside a running event loop."""

    def __init__(
        self,
        forward: ForwardFn,
        merge_size: int,
        max_batch_patches: int,
        max_queue_images: int,
        on_batch: Callable[[BatchStats], None] | None = None,
        batch_wait_s: float = 0.0,
    ):
        if max_batch_patches <= 0 or max_queue_images <= 0:
            raise ValueError("max_batch_patches and max_queue_images must be positive")
        self._forward = forward
        self._merge_size = merge_size
        self.max_batch_patches = max_batch_patches
        self.max_queue_images = max_queue_images
        self._on_batch = on_batch
        # Holding a partial batch this long after its first image trades latency for larger batches.
        self.batch_wait_s = batch_wait_s
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision")
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queued_patches(self) -> int:
        return sum(p.num_patches for p in self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="vision-batcher")

    async def close(self) -> None:
        """Stop the loop; images still queued fail with BatcherClosedError."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(BatcherClosedError("the encode service is shutting down"))
        self._executor.shutdown(wait=True)

    def submit(
        self,
        pixel_values: torch.Tensor,
        grid_thw: tuple[int, int, int],
        deadline: float | None = None,
    ) -> asyncio.Future:
        """Queue one image; the future resolves to its packed embeddings [tokens, (1+k)*H].

        `deadline` is on the event loop's clock (loop.time()). Cancelling the future withdraws the
        image if it has not started. Raises VisionQueueFullError when the queue is at its limit.
        """
        if self._closed:
            raise BatcherClosedError("the encode service is shutting down")
        if len(self._queue) >= self.max_queue_images:
            raise VisionQueueFullError(
                f"vision queue is full ({self.max_queue_images} images waiting); retry later"
            )
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append(_Pending(pixel_values, grid_thw, future, deadline, loop.time()))
        self._wakeup.set()
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._fill_window(loop)
                batch = self._take_batch(loop.time())
                if batch:
                    await self._execute(batch, loop)

    async def _fill_window(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.batch_wait_s <= 0:
            return
        while self._queue and self.queued_patches < self.max_batch_patches:
            remaining = self._queue[0].enqueued_at + self.batch_wait_s - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:  # woken early by each new image, to re-check whether the batch is full
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self, now: float) -> list[_Pending]:
        """FIFO images up to max_batch_patches; drops withdrawn and expired ones on the way."""
        batch: list[_Pending] = []
        patches = 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # withdrawn by a cancelled request
                self._queue.popleft()
                continue
            if item.deadline is not None and now >= item.deadline:
                self._queue.popleft()
                item.future.set_exception(
                    DeadlineExpiredError("deadline passed while the image waited for the encoder")
                )
                continue
            if batch and patches + item.num_patches > self.max_batch_patches:
                break
            batch.append(self._queue.popleft())
            patches += item.num_patches
        return batch

    async def _execute(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        started = loop.time()
        t0 = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self._forward_batch, batch)
        except Exception as exc:  # one bad batch must not stop the loop
            log.exception("vision forward failed for a batch of %d image(s)", len(batch))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        stats = BatchStats(
            num_images=len(batch),
            num_patches=sum(p.num_patches for p in batch),
            forward_s=time.perf_counter() - t0,
            max_wait_s=max(started - p.enqueued_at for p in batch),
        )
        log.debug(
            "vision batch: %d images, %d patches, %.1f ms",
            stats.num_images,
            stats.num_patches,
            stats.forward_s * 1e3,
        )
        if self._on_batch is not None:
            self._on_batch(stats)
        for item, out in zip(batch, outputs, strict=True):
            if not item.future.done():
                item.future.set_result(out)

    def _forward_batch(self, batch: list[_Pending]) -> list[torch.Tensor]:
        """Runs on the vision thread: one forward over the concatenated images."""
        if len(batch) == 1:
            pixel_values = batch[0].pixel_values
        else:
            pixel_values = torch.cat([p.pixel_values for p in batch])
        grid = torch.tensor([p.grid_thw for p in batch], dtype=torch.long)
        with torch.inference_mode():
            packed = self._forward(pixel_values, grid)
        if len(batch) == 1:
            return [packed]
        tokens = [p.num_patches // self._merge_size**2 for p in batch]
        # Own storage per image: a view would keep the whole batch alive in the cache.
        return [part.clone() for part in packed.split(tokens)]
