"""Videos in the encode service: their bytes, limits, hash and the sampled clip.

A clip is decoded and preprocessed on the preprocessing pool (`shared.model.video_decode`, every
step bounded); its temporal groups then go through the vision batcher as separate (1, h, w)
pictures, so a long clip never makes one oversized forward and its groups share forwards with
other requests' images. The vision tower attends within a temporal group only, so the groups'
rows are the rows of the whole clip's forward, in order.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import torch

from services.encode.batcher import VisionBatcher
from services.encode.config import EncodeLimits
from services.encode.sources import ImageSources
from shared.model.video import VideoError, VideoProcessorConfig, apply_sampling
from shared.model.video_decode import SampledClip, load_video
from shared.wire.dataurl import VIDEO_TYPES
from shared.wire.images import ImageRef


class VideoInputs:
    """Limits, sources and preprocessing of the videos of requests."""

    def __init__(self, processor: VideoProcessorConfig, limits: EncodeLimits) -> None:
        self.processor = replace(
            processor, max_frames=min(processor.max_frames, limits.max_video_frames)
        )
        self.limits = limits
        self.video_limits = limits.video_limits()
        policy = replace(limits.fetch_policy(), max_bytes=limits.max_video_bytes)
        self._sources = ImageSources(policy, limits.allow_url_fetch, VIDEO_TYPES)

    def check(self, spec: ImageRef) -> None:
        """Size limits, before any work; raises VideoError."""
        size = len(spec.data) if spec.data is not None else sum(map(len, spec.frames))
        if size > self.limits.max_video_bytes:
            limit = self.limits.max_video_bytes
            raise VideoError(f"the video is {size} bytes; the limit is {limit}")
        if len(spec.frames) > self.video_limits.max_total_frames:
            raise VideoError(
                f"{len(spec.frames)} frames; the limit is {self.video_limits.max_total_frames}"
            )
        self.bounds(spec)

    def bounds(self, spec: ImageRef) -> tuple[int, int]:
        """(min, max) pixels of the whole sampled clip: the request's within the processor's."""
        ceiling = self.processor.max_pixels
        max_pixels = spec.max_pixels or ceiling
        min_pixels = spec.min_pixels or min(self.processor.min_pixels, max_pixels)
        if max_pixels > ceiling:
            raise VideoError(f"max_pixels {max_pixels} is over this service's limit {ceiling}")
        if min_pixels > max_pixels:
            raise VideoError(f"min_pixels {min_pixels} is greater than max_pixels {max_pixels}")
        return min_pixels, max_pixels

    async def source(self, spec: ImageRef) -> bytes | tuple[bytes, ...] | None:
        """The clip's bytes, its frames, or None (a hash-only reference)."""
        if spec.frames:
            return spec.frames
        if spec.data is not None:
            return spec.data
        if spec.url:
            return await self._sources.load(spec.url)
        return None

    def load(self, data: bytes | tuple[bytes, ...], spec: ImageRef, bounds) -> SampledClip:
        """Decode, sample and preprocess (on the preprocessing pool); raises VideoError."""
        cfg = apply_sampling(self.processor, spec.video, *bounds)
        if isinstance(data, tuple):
            return load_video(None, data, spec.video, cfg, self.video_limits)
        return load_video(data, (), spec.video, cfg, self.video_limits)


async def encode_groups(
    batcher: VisionBatcher, clip: SampledClip, deadline: float | None
) -> torch.Tensor:
    """The clip's packed embeddings, its temporal groups submitted to the batcher together."""
    t, h, w = clip.grid_thw
    groups = clip.pixel_values.split(h * w)
    packed = await asyncio.gather(*(batcher.submit(g, (1, h, w), deadline) for g in groups))
    return torch.cat(packed)
