"""A chat request's images and videos: counted against the limits, loaded, encoded, and their
prompt token counts computed without encoding them (`/tokenize`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.language.encoder.client import EncodeError
from services.language.errors import BadRequestError
from services.language.frontend.failures import encode_failure
from services.language.frontend.image_policy import ImagePolicy, PixelLimits
from services.language.frontend.images import ImageLoader, check_image_bytes
from services.language.frontend.metrics import LanguageMetrics
from services.language.frontend.ports import ImageEncoder
from services.language.frontend.prompt import ImagePart, MediaPart, VideoPart
from services.language.frontend.video_policy import VideoPolicy, VideoRequest
from shared.wire.images import (
    EncodedImage,
    ImageRef,
    PendingImage,
    VideoSampling,
    content_hash,
    group_hash,
)


@dataclass(frozen=True)
class MediaOptions:
    """A request's image resize bounds and video options (`mm_processor_kwargs`)."""

    pixels: PixelLimits = field(default_factory=PixelLimits)
    video: VideoRequest = field(default_factory=VideoRequest)


class MediaInputs:
    """Turns image and video parts into encoded images, or into token counts."""

    def __init__(
        self,
        loader: ImageLoader,
        encoder: ImageEncoder | None,
        images: ImagePolicy,
        videos: VideoPolicy,
        metrics: LanguageMetrics,
        retry_after_s: int = 1,
    ) -> None:
        self.loader = loader
        self.encoder = encoder
        self.images = images
        self.videos = videos
        self.metrics = metrics
        self.retry_after_s = retry_after_s

    def check_counts(self, parts: Sequence[MediaPart]) -> None:
        """The per-prompt limits, before anything is loaded."""
        num_videos = sum(isinstance(part, VideoPart) for part in parts)
        self.images.check_count(len(parts) - num_videos)
        self.videos.check_count(num_videos)

    async def encode(self, parts: Sequence[MediaPart], options: MediaOptions) -> list[EncodedImage]:
        """Each part's packed embeddings, in order, through the encode client."""
        if self.encoder is None:
            raise BadRequestError("this server has no encode service; images are not accepted")
        start = time.monotonic()
        refs = await asyncio.gather(*(self._ref(part, options) for part in parts))
        try:
            encoded = await self.encoder.encode(refs)
        except EncodeError as exc:
            raise encode_failure(exc, self.retry_after_s) from exc
        self.metrics.encode_latency.observe(time.monotonic() - start)
        return list(encoded)

    async def _ref(self, part: MediaPart, options: MediaOptions) -> ImageRef:
        if isinstance(part, ImagePart):
            pixels = options.pixels
            data = await self.image_bytes(part)
            return ImageRef(data=data, min_pixels=pixels.min_pixels, max_pixels=pixels.max_pixels)
        video = options.video
        sampling = video.sampling
        if part.frames:
            sampling = VideoSampling(
                sampling.fps, sampling.num_frames, sampling.cap_pixels_per_frame, part.frames_fps
            )
            data = None
        else:
            data = await self.video_bytes(part)
        return ImageRef(
            data=data,
            min_pixels=video.min_pixels,
            max_pixels=video.max_pixels,
            video=sampling,
            frames=part.frames,
        )

    async def image_bytes(self, part: ImagePart) -> bytes:
        if part.data is not None:
            return self.loader.check(part.data)
        return await self.loader.load(part.url)

    async def video_bytes(self, part: VideoPart) -> bytes:
        if part.data is not None:
            return self.loader.check_video(part.data)
        return await self.loader.load_video(part.url)

    async def plan(self, parts: Sequence[MediaPart], options: MediaOptions) -> MediaPlan:
        """What each part's encoding will be (grid, group times, content hash), from the files'
        headers: loaded and read, nothing encoded. The prompt can be laid out from it and sent
        to the engine before the first image is encoded."""
        if self.images.processor is None:
            raise BadRequestError("this server has no image processor; images are not accepted")
        planned = await asyncio.gather(*(self._plan(part, options) for part in parts))
        return MediaPlan(tuple(planned), self.images.processor.merge_size)

    async def _plan(self, part: MediaPart, options: MediaOptions) -> PlannedPart:
        ref = await self._ref(part, options)
        if isinstance(part, ImagePart):
            w, h = check_image_bytes(ref.data, self.loader.config.max_image_pixels)
            grid = self.images.grid(w, h, options.pixels)
            return PlannedPart(ref, grid, await _hash(ref.data))
        if part.frames:
            raise BadRequestError("a video sent as frames cannot be counted before encoding")
        grid, timestamps = await asyncio.to_thread(self.videos.plan, ref.data, options.video)
        return PlannedPart(ref, grid, await _hash(ref.data), timestamps)


async def _hash(data: bytes) -> str:
    # sha256 of megabytes: off the event loop (hashlib releases the GIL)
    return (
        await asyncio.to_thread(content_hash, data) if len(data) > 1 << 18 else content_hash(data)
    )


@dataclass(frozen=True)
class PlannedPart:
    """An image or video as the encode service will return it, known before it is encoded."""

    ref: ImageRef
    grid_thw: tuple[int, int, int]
    content_hash: str
    timestamps: tuple[float, ...] = ()  # a video's group times

    def placeholders(self, merge_size: int) -> list[PendingImage]:
        """What stands for it in the engine's request until it arrives (one per video group)."""
        t, h, w = self.grid_thw
        rows = h * w // merge_size**2
        if not self.timestamps:
            return [PendingImage(self.grid_thw, t * rows, self.content_hash)]
        return [
            PendingImage((1, h, w), rows, group_hash(self.content_hash, self.grid_thw, g, time))
            for g, time in enumerate(self.timestamps)
        ]


@dataclass(frozen=True)
class MediaPlan:
    """A prompt's planned images and videos, in prompt order."""

    parts: tuple[PlannedPart, ...]
    merge_size: int

    @property
    def videos(self) -> list[tuple[float, ...]]:
        return [part.timestamps for part in self.parts if part.timestamps]

    def placeholders(self) -> list[PendingImage]:
        return [p for part in self.parts for p in part.placeholders(self.merge_size)]

    def slots(self) -> list[list[int]]:
        """The engine image indices of each part (a video's groups are consecutive)."""
        slots, start = [], 0
        for part in self.parts:
            count = len(part.timestamps) or 1
            slots.append(list(range(start, start + count)))
            start += count
        return slots
