"""Per-request video controls: how many videos a prompt may hold, how a video is sampled
(`mm_processor_kwargs`), and a clip's token layout computed from its headers alone.

`mm_processor_kwargs` keys for videos: `fps` (frames sampled per second), `num_frames` (exactly
this many instead), `cap_pixels_per_frame` (also cap each frame's pixels, as the reference
qwen-vl-utils does), and `videos_kwargs`, an object that may hold those three and the video's
pixel budget `min_pixels` / `max_pixels` (pixels of the whole sampled clip, frames x height x
width, as the checkpoint's `video_preprocessor_config.json` size is). The top-level `min_pixels`
and `max_pixels` stay the images'.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.language.errors import BadRequestError, ImageInputError
from shared.model.video import VideoError, VideoProcessorConfig, apply_sampling
from shared.model.video_decode import VideoLimits, plan_video
from shared.wire.errors import ImageRefError
from shared.wire.images import VideoSampling

SAMPLING_KWARGS = ("fps", "num_frames", "cap_pixels_per_frame")
VIDEO_KWARGS = (*SAMPLING_KWARGS, "videos_kwargs")
_NESTED_KWARGS = (*SAMPLING_KWARGS, "min_pixels", "max_pixels")


def check_media_count(kind: str, count: int, limit: int | None) -> None:
    """400 when a prompt holds more images (videos) than --limit-mm-per-prompt allows."""
    if limit is not None and count > limit:
        raise BadRequestError(
            f"the prompt has {count} {kind}, but this server accepts at most {limit} per "
            f"prompt (--limit-mm-per-prompt); send fewer {kind}",
            param="messages",
        )


@dataclass(frozen=True)
class VideoRequest:
    """A request's video options; None leaves the processor's value."""

    sampling: VideoSampling = field(default_factory=VideoSampling)
    min_pixels: int | None = None
    max_pixels: int | None = None


@dataclass(frozen=True)
class VideoPolicy:
    """The server's video limits; `processor` is None for text-only models."""

    processor: VideoProcessorConfig | None = None
    max_videos_per_prompt: int | None = None  # --limit-mm-per-prompt '{"video": M}'
    limits: VideoLimits = field(default_factory=VideoLimits)

    def check_count(self, num_videos: int) -> None:
        """400 when a prompt holds more videos than the server allows (before any is loaded)."""
        check_media_count("videos", num_videos, self.max_videos_per_prompt)

    def options(self, kwargs: Mapping[str, Any] | None) -> VideoRequest:
        """The video options of `mm_processor_kwargs` (its other keys are the images')."""
        if not kwargs:
            return VideoRequest()
        values = {k: kwargs[k] for k in SAMPLING_KWARGS if k in kwargs}
        nested = kwargs.get("videos_kwargs")
        if nested is not None:
            if not isinstance(nested, Mapping):
                raise _bad("videos_kwargs must be an object", "videos_kwargs")
            unknown = sorted(set(nested) - set(_NESTED_KWARGS))
            if unknown:
                raise _bad(
                    f"videos_kwargs {unknown} are not supported; only {list(_NESTED_KWARGS)} are",
                    "videos_kwargs",
                )
            values.update(nested)
        return self._checked(values)

    def _checked(self, values: dict[str, Any]) -> VideoRequest:
        for name in ("num_frames", "min_pixels", "max_pixels"):
            value = values.get(name)
            if value is not None and (type(value) is not int or value < 1):
                raise _bad(f"{name} must be a positive integer, got {value!r}", name)
        fps = values.get("fps")
        if fps is not None and (type(fps) not in (int, float) or not 0 < fps <= 240):
            raise _bad(f"fps must be a number in (0, 240], got {fps!r}", "fps")
        cap = values.get("cap_pixels_per_frame")
        if cap is not None and type(cap) is not bool:
            raise _bad(f"cap_pixels_per_frame must be true or false, got {cap!r}", "cap")
        try:
            sampling = VideoSampling(
                fps=None if fps is None else float(fps),
                num_frames=values.get("num_frames"),
                cap_pixels_per_frame=cap,
            )
        except ImageRefError as exc:
            raise _bad(str(exc), "num_frames") from exc
        request = VideoRequest(sampling, values.get("min_pixels"), values.get("max_pixels"))
        if self.processor is not None:
            self._check_bounds(request)
        return request

    def _check_bounds(self, request: VideoRequest) -> None:
        cfg = self.processor
        if request.max_pixels is not None and request.max_pixels > cfg.max_pixels:
            raise _bad(
                f"the video max_pixels {request.max_pixels} is over this server's limit of "
                f"{cfg.max_pixels} pixels per clip",
                "max_pixels",
            )
        if request.sampling.num_frames is not None and request.sampling.num_frames > cfg.max_frames:
            raise _bad(
                f"num_frames {request.sampling.num_frames} is over this server's limit of "
                f"{cfg.max_frames}",
                "num_frames",
            )
        high = request.max_pixels or cfg.max_pixels
        low = request.min_pixels or min(cfg.min_pixels, high)
        if low > high:
            raise _bad(
                f"the video min_pixels {low} is greater than max_pixels {high}", "min_pixels"
            )

    def bounds(self, request: VideoRequest) -> tuple[int, int]:
        """(min_pixels, max_pixels) of a clip of this request, the encode service's rule."""
        high = request.max_pixels or self.processor.max_pixels
        return request.min_pixels or min(self.processor.min_pixels, high), high

    def plan(self, data: bytes, request: VideoRequest):
        """(grid_thw, group timestamps) of a clip, from its headers: what the encode service
        will return for it, computed without decoding a frame."""
        if self.processor is None:
            raise BadRequestError("this server has no video processor; videos are not accepted")
        cfg = apply_sampling(self.processor, request.sampling, *self.bounds(request))
        try:
            return plan_video(data, request.sampling, cfg, self.limits)
        except VideoError as exc:
            raise ImageInputError(f"video: {exc}") from exc


def _bad(message: str, name: str) -> BadRequestError:
    return BadRequestError(f"mm_processor_kwargs: {message}", param=f"mm_processor_kwargs.{name}")
