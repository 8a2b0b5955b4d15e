"""Images in, packed embeddings out: the encode service's logic, free of gRPC.

Per image: bytes (inline or from a URL) -> sha256 -> cache lookup -> decode + preprocess on a thread
pool -> the batcher's shared vision forward -> cache. Concurrent requests for the same image share
one computation. A video takes the same path (`videos.py`), keyed also by its sampling options.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from services.encode.batcher import DeadlineExpiredError, VisionBatcher
from services.encode.cache import CacheEntry, CacheKey, EmbeddingCache
from services.encode.config import EncodeLimits
from services.encode.metrics import EncodeMetrics
from services.encode.sources import ImageSourceError, ImageSources
from services.encode.videos import VideoInputs, encode_groups
from shared.model.processing import (
    ImageError,
    ImageProcessorConfig,
    decode_image,
    preprocess_image,
)
from shared.model.video import VideoError, VideoProcessorConfig
from shared.wire.errors import ImageRefError
from shared.wire.images import (
    EncodedImage,
    ImageRef,
    content_hash,
    frames_hash,
    normalize_hash,
)

log = logging.getLogger(__name__)

# Hash large images on a thread: hashlib releases the GIL, the event loop keeps serving.
_HASH_OFF_LOOP_BYTES = 256 * 1024


class InvalidImageError(ValueError):
    """A request or one of its images breaks a limit or cannot be decoded (INVALID_ARGUMENT)."""


class NotCachedError(LookupError):
    """A hash-only image is not in this replica's cache; send its bytes (NOT_FOUND)."""


class VisionEncoder:
    """Turns ImageRefs into EncodedImages; use it inside the event loop that runs the batcher."""

    def __init__(
        self,
        processor: ImageProcessorConfig,
        limits: EncodeLimits,
        batcher: VisionBatcher,
        cache: EmbeddingCache,
        metrics: EncodeMetrics,
        preprocess_workers: int = 2,
        video_processor: VideoProcessorConfig | None = None,
    ):
        self.processor = processor
        self.videos = VideoInputs(video_processor or VideoProcessorConfig(), limits)
        self.limits = limits
        self._sources = ImageSources(limits.fetch_policy(), limits.allow_url_fetch)
        self.max_pixels = limits.max_pixels or processor.max_pixels
        self.batcher = batcher
        self.cache = cache
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(preprocess_workers, thread_name_prefix="preprocess")
        self._inflight: dict[CacheKey, asyncio.Task] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def check_request(self, images: Sequence[ImageRef]) -> None:
        """Request-level limits, checked before any work."""
        if not images:
            raise InvalidImageError("the request has no images")
        if len(images) > self.limits.max_images_per_request:
            raise InvalidImageError(
                f"{len(images)} images in one request; the limit is "
                f"{self.limits.max_images_per_request}: split the request"
            )
        for i, spec in enumerate(images):
            if spec.data is None and not spec.url and not spec.frames and not spec.content_hash:
                raise InvalidImageError(f"image {i} has no data, url or content_hash")
            if spec.video is not None:
                try:
                    self.videos.check(spec)
                except VideoError as exc:
                    raise InvalidImageError(f"video {i}: {exc}") from exc
                continue
            if spec.data is not None and len(spec.data) > self.limits.max_image_bytes:
                raise InvalidImageError(
                    f"image {i} is {len(spec.data)} bytes; the limit is "
                    f"{self.limits.max_image_bytes}"
                )
            self._pixel_bounds(i, spec)

    async def encode(
        self, images: Sequence[ImageRef], deadline: float | None = None
    ) -> AsyncIterator[tuple[int, EncodedImage]]:
        """Encode a request's images concurrently, yielding (index, image) as each completes.

        `deadline` is on the event loop clock. The first failure cancels the other images and
        propagates (InvalidImageError, NotCachedError, VisionQueueFullError, DeadlineExpiredError).
        """
        self.check_request(images)
        tasks = [
            asyncio.ensure_future(self._encode_one(i, spec, deadline))
            for i, spec in enumerate(images)
        ]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _pixel_bounds(self, index: int, spec: ImageRef) -> tuple[int, int]:
        max_pixels = spec.max_pixels or self.max_pixels
        min_pixels = spec.min_pixels or min(self.processor.min_pixels, max_pixels)
        if max_pixels > self.max_pixels:
            raise InvalidImageError(
                f"image {index}: max_pixels {max_pixels} is over this service's limit "
                f"{self.max_pixels}"
            )
        if min_pixels > max_pixels:
            raise InvalidImageError(
                f"image {index}: min_pixels {min_pixels} is greater than max_pixels {max_pixels}"
            )
        return min_pixels, max_pixels

    async def _encode_one(
        self, index: int, spec: ImageRef, deadline: float | None
    ) -> tuple[int, EncodedImage]:
        try:
            if spec.video is None:
                min_pixels, max_pixels = self._pixel_bounds(index, spec)
                data = await self._image_bytes(spec)
            else:
                min_pixels, max_pixels = self.videos.bounds(spec)
                data = await self.videos.source(spec)
            if isinstance(data, tuple):
                digest = frames_hash(data)
            else:
                digest = await self._hash(data, spec.content_hash)
        except (ImageSourceError, ImageRefError, VideoError) as exc:
            kind = "image" if spec.video is None else "video"
            raise InvalidImageError(f"{kind} {index}: {exc}") from exc
        video = "" if spec.video is None else spec.video.key()
        key = CacheKey(digest, min_pixels, max_pixels, video)
        entry = self.cache.get(key)
        if entry is not None:
            self.metrics.cache_hits.inc()
            return index, _encoded(entry, digest, cache_hit=True)
        if data is None and key not in self._inflight:
            raise NotCachedError(
                f"image {index}: content_hash {digest} is not cached on this replica; "
                "send the bytes"
            )
        entry = await self._shared_compute(index, key, (data, spec), deadline)
        return index, _encoded(entry, digest, cache_hit=False)

    async def _image_bytes(self, spec: ImageRef) -> bytes | None:
        if spec.data is not None:
            return spec.data
        if spec.url:
            return await self._sources.load(spec.url)
        return None

    async def _hash(self, data: bytes | None, claimed: str | None) -> str:
        claimed = normalize_hash(claimed) if claimed else None
        if data is None:
            return claimed  # check_request guarantees a hash when there are no bytes
        if len(data) > _HASH_OFF_LOOP_BYTES:
            digest = await asyncio.get_running_loop().run_in_executor(
                self._pool, content_hash, data
            )
        else:
            digest = content_hash(data)
        if claimed is not None and claimed != digest:
            raise ImageRefError(
                f"content_hash {claimed} does not match the bytes (sha256 {digest})"
            )
        return digest

    async def _shared_compute(
        self, index: int, key: CacheKey, source: tuple, deadline: float | None
    ) -> CacheEntry:
        """Join the computation of this key, or start it; a waiter outliving the starter's deadline
        starts a fresh one instead of inheriting its DeadlineExpiredError. `source` is (bytes,
        frames or None, the ImageRef)."""
        for _attempt in range(2):
            task = self._inflight.get(key)
            owned = task is None
            if owned:
                if source[0] is None:
                    raise NotCachedError(
                        f"image {index}: content_hash {key.content_hash} is not "
                        "cached on this replica; send the bytes"
                    )
                task = asyncio.ensure_future(self._compute(index, key, source, deadline))
                self._inflight[key] = task
                task.add_done_callback(lambda t, k=key: self._forget(k, t))
            try:
                return await asyncio.shield(task)
            except DeadlineExpiredError:
                loop_now = asyncio.get_running_loop().time()
                if owned or (deadline is not None and loop_now >= deadline):
                    raise
        raise DeadlineExpiredError(f"image {index}: deadline passed waiting for the encoder")

    def _forget(self, key: CacheKey, task: asyncio.Task) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here so an unwaited failure is not logged as lost

    async def _compute(self, index: int, key: CacheKey, source, deadline) -> CacheEntry:
        data, spec = source
        loop = asyncio.get_running_loop()
        if spec.video is not None:
            bounds = (key.min_pixels, key.max_pixels)
            load = self._load_video
            clip = await loop.run_in_executor(self._pool, load, index, data, spec, bounds)
            self.metrics.cache_misses.inc()
            packed = await encode_groups(self.batcher, clip, deadline)
            entry = CacheEntry(packed, clip.grid_thw, clip.timestamps)
        else:
            cfg = self.processor.with_pixel_limits(key.min_pixels, key.max_pixels)
            max_decoded = self.limits.max_decoded_pixels
            pixel_values, grid = await loop.run_in_executor(
                self._pool, _decode_and_preprocess, index, data, cfg, max_decoded
            )
            self.metrics.cache_misses.inc()
            packed = await self.batcher.submit(pixel_values, grid, deadline)
            entry = CacheEntry(packed, grid)
        self.cache.put(key, entry)
        self.metrics.cache_bytes.set(self.cache.nbytes)
        self.metrics.cache_entries.set(len(self.cache))
        return entry

    def _load_video(self, index: int, data, spec: ImageRef, bounds):
        try:
            return self.videos.load(data, spec, bounds)
        except VideoError as exc:
            raise InvalidImageError(f"video {index}: {exc}") from exc


def _encoded(entry: CacheEntry, digest: str, cache_hit: bool) -> EncodedImage:
    return EncodedImage(
        entry.packed, entry.grid_thw, digest, cache_hit=cache_hit, timestamps=entry.timestamps
    )


def _decode_and_preprocess(
    index: int, data: bytes, cfg: ImageProcessorConfig, max_decoded_pixels: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Runs on the preprocessing pool: bytes -> (pixel_values [N, patch_dim], grid_thw)."""
    try:
        image = decode_image(data, max_decoded_pixels)
        return preprocess_image(image, cfg)
    except ImageError as exc:
        raise InvalidImageError(f"image {index}: {exc}") from exc
