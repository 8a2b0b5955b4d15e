"""Video decoding with PyAV (FFmpeg inside the wheel): metadata, then only the sampled frames.

Every step is bounded (`VideoLimits`): the bytes, the clip's duration, frame size and count,
and the wall time of decoding. Frames are numbered in decode order from 0, as transformers'
PyAV loader numbers them; a long clip is not decoded whole: where the next wanted frame lies
further ahead than `seek_gap` frames, the decoder seeks to the keyframe before it and finds it
by its timestamp (frame index = time x fps, exact for constant-frame-rate clips; a clip whose
rate, length and frame count disagree is decoded front to back instead).
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from shared.model.processing import ImageError, decode_image
from shared.model.video import (
    VideoError,
    VideoProcessorConfig,
    group_timestamps,
    preprocess_video,
    sample_indices,
    video_grid,
)
from shared.wire.images import VideoSampling


@dataclass(frozen=True)
class VideoLimits:
    """What a server accepts; all are checked before or while decoding."""

    max_bytes: int = 256 << 20
    max_duration_s: float = 20 * 60.0
    max_frame_pixels: int = 3840 * 2160  # 4K frames; an 8K clip is refused
    min_frame_side: int = 2
    max_total_frames: int = 200_000  # frames in the container (a 20-minute clip at 120 fps)
    decode_timeout_s: float = 60.0
    seek_gap: int = 64  # decode forward through gaps up to this many frames, seek past longer


@dataclass(frozen=True)
class VideoMeta:
    """A clip's video stream: frame count, frames per second, frame size, length."""

    num_frames: int
    fps: float
    width: int
    height: int
    duration_s: float


def _open(data: bytes):
    import av

    if not data:
        raise VideoError("video is empty (0 bytes)")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise VideoError(
            f"cannot read the video (not a video file, or cut short): {_reason(exc)}"
        ) from exc
    if not container.streams.video:
        container.close()
        raise VideoError("the file has no video stream (audio only?)")
    return container


def _reason(exc: BaseException) -> str:
    # FFmpeg's messages end with the file name, which an in-memory file lacks
    return (str(exc).replace(": '<none>'", "").strip()) or type(exc).__name__


def _count_frames(container, stream, limits: VideoLimits) -> int:
    # Containers that do not record the count (webm, gif): count the packets, without decoding
    count = 0
    for packet in container.demux(stream):
        if packet.size:
            count += 1
            if count > limits.max_total_frames:
                break
    container.seek(0)
    return count


def _meta(container, limits: VideoLimits, size: int) -> VideoMeta:
    if size > limits.max_bytes:
        raise VideoError(f"video is {size} bytes, over the limit of {limits.max_bytes}")
    stream = container.streams.video[0]
    width, height = int(stream.codec_context.width), int(stream.codec_context.height)
    if min(width, height) < limits.min_frame_side:
        raise VideoError(f"video frames are {width}x{height}, too small to see anything")
    if width * height > limits.max_frame_pixels:
        raise VideoError(
            f"video frames are {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_frame_pixels}"
        )
    num_frames = int(stream.frames) or _count_frames(container, stream, limits)
    if num_frames < 1:
        raise VideoError("the video has no frames")
    if num_frames > limits.max_total_frames:
        raise VideoError(f"video has over {limits.max_total_frames} frames, the limit")
    duration = _duration(container, stream)
    rate = stream.average_rate or stream.guessed_rate
    if rate:
        fps = float(rate)
    elif duration:
        fps = num_frames / duration
    else:
        raise VideoError("the video has neither a frame rate nor a duration")
    if not duration:
        duration = num_frames / fps
    if duration > limits.max_duration_s:
        raise VideoError(
            f"video is {duration:.0f} s long, over the limit of {limits.max_duration_s:.0f} s"
        )
    return VideoMeta(num_frames, fps, width, height, duration)


def _duration(container, stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000
    return 0.0


def probe(data: bytes, limits: VideoLimits | None = None) -> VideoMeta:
    """The clip's metadata (headers only, or a packet count where the container has none)."""
    import av

    limits = limits or VideoLimits()
    container = _open(data)
    try:
        return _meta(container, limits, len(data))
    except av.FFmpegError as exc:
        raise VideoError(f"cannot read the video: {_reason(exc)}") from exc
    finally:
        container.close()


def decode_frames(
    data: bytes, indices, limits: VideoLimits | None = None
) -> tuple[np.ndarray, VideoMeta]:
    """The frames at `indices` (decode-order numbers, repeats allowed) as uint8 [n, H, W, 3]."""
    import av

    limits = limits or VideoLimits()
    deadline = time.monotonic() + limits.decode_timeout_s
    container = _open(data)
    try:
        meta = _meta(container, limits, len(data))
        wanted = sorted({int(i) for i in indices})
        if not wanted or wanted[0] < 0 or wanted[-1] >= meta.num_frames:
            raise VideoError(f"frame indices {wanted[:3]}... outside 0..{meta.num_frames - 1}")
        found = _decode(container, wanted, meta, limits, deadline)
    except av.FFmpegError as exc:
        raise VideoError(f"cannot decode the video: {_reason(exc)}") from exc
    finally:
        container.close()
    missing = [i for i in wanted if i not in found]
    if missing:
        raise VideoError(
            f"the video ends before frame {missing[0]} (its header says {meta.num_frames} frames; "
            "truncated?)"
        )
    return np.stack([found[int(i)] for i in indices]), meta


def _decode(container, wanted: list[int], meta: VideoMeta, limits, deadline) -> dict:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    base = stream.start_time or 0
    tb = stream.time_base or Fraction(1, 1)
    found: dict[int, np.ndarray] = {}
    pending = list(wanted)
    frames = container.decode(stream)
    position, by_time, sought = -1, False, None
    # Seeking numbers frames by time: only where the rate, length and count agree (not GIFs,
    # whose per-frame delays the average rate rounds)
    seekable = abs(meta.duration_s * meta.fps - meta.num_frames) <= 1.5
    while pending:
        target = pending[0]
        if seekable and target - position > limits.seek_gap and sought != target:
            # Far ahead: seek to the keyframe before the target's time, then number the frames
            # by their timestamps; decode forward from there however far the keyframe was
            pts = base + int(Fraction(target) / Fraction(meta.fps) / tb)
            container.seek(pts, stream=stream, backward=True, any_frame=False)
            frames, by_time, sought = container.decode(stream), True, target
        frame = next(frames, None)
        if frame is None:
            break  # the stream ended
        if time.monotonic() > deadline:
            raise VideoError(f"decoding took over {limits.decode_timeout_s:g} s (the limit)")
        if by_time:
            if frame.pts is None:
                raise VideoError("the video's frames carry no timestamps; cannot seek in it")
            position = round(float((frame.pts - base) * tb) * meta.fps)
        else:
            position += 1
        if pending[0] <= position:
            picture = frame.to_ndarray(format="rgb24")
            # A wanted frame passed over (timestamps that skip) takes the next one
            while pending and pending[0] <= position:
                found[pending.pop(0)] = picture
    return found


def frames_from_images(images: list[bytes], max_pixels: int) -> np.ndarray:
    """A video given as a list of image files: uint8 [n, H, W, 3]; every frame the same size."""
    if not images:
        raise VideoError("a video given as frames needs at least one frame")
    arrays = []
    for i, data in enumerate(images):
        try:
            arrays.append(np.asarray(decode_image(data, max_pixels), dtype=np.uint8))
        except ImageError as exc:
            raise VideoError(f"frame {i}: {exc}") from exc
        if arrays[-1].shape != arrays[0].shape:
            raise VideoError(
                f"frame {i} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]}, frame 0 is "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}: frames must share one size"
            )
    return np.stack(arrays)


@dataclass(frozen=True)
class SampledClip:
    """What a video becomes before the vision tower: pixel rows, grid and group times."""

    pixel_values: torch.Tensor  # [t*h*w, 3*2*16*16]
    grid_thw: tuple[int, int, int]
    timestamps: tuple[float, ...]
    meta: VideoMeta


def _sampling_plan(
    total: int, fps: float, sampling: VideoSampling, cfg: VideoProcessorConfig
) -> tuple[np.ndarray, tuple[float, ...]]:
    if sampling.num_frames is not None and sampling.num_frames > cfg.max_frames:
        raise VideoError(f"num_frames {sampling.num_frames} is over the limit of {cfg.max_frames}")
    indices = sample_indices(total, fps, cfg, sampling.num_frames)
    return indices, tuple(group_timestamps(indices, fps, cfg.temporal_patch_size))


def plan_video(
    data: bytes,
    sampling: VideoSampling,
    cfg: VideoProcessorConfig,
    limits: VideoLimits | None = None,
) -> tuple[tuple[int, int, int], tuple[float, ...]]:
    """(grid_thw, group timestamps) of a clip from its headers alone, nothing decoded: what
    counting its prompt tokens needs."""
    meta = probe(data, limits)
    indices, timestamps = _sampling_plan(meta.num_frames, meta.fps, sampling, cfg)
    return video_grid(len(indices), meta.height, meta.width, cfg), timestamps


def load_video(
    data: bytes | None,
    frames: Sequence[bytes],
    sampling: VideoSampling,
    cfg: VideoProcessorConfig,
    limits: VideoLimits | None = None,
) -> SampledClip:
    """A clip (file bytes, or image files one per frame) sampled, decoded and preprocessed."""
    limits = limits or VideoLimits()
    if frames:
        if len(frames) > limits.max_total_frames:
            raise VideoError(f"{len(frames)} frames, over the limit of {limits.max_total_frames}")
        clip = frames_from_images(list(frames), limits.max_frame_pixels)
        fps = float(sampling.frames_fps or cfg.fps)
        _, height, width, _ = clip.shape
        meta = VideoMeta(len(clip), fps, width, height, len(clip) / fps)
        indices, timestamps = _sampling_plan(meta.num_frames, fps, sampling, cfg)
        picked = clip[indices]
    else:
        meta = probe(data, limits)
        indices, timestamps = _sampling_plan(meta.num_frames, meta.fps, sampling, cfg)
        picked, meta = decode_frames(data, indices, limits)
    pixel_values, grid = preprocess_video(picked, cfg)
    return SampledClip(pixel_values, grid, timestamps, meta)
