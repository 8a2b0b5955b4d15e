"""Generated clips for `--dataset-name random-video`: each one distinct (a seeded colour field
with a bar that sweeps across it), encoded as a real h264 / vp9 / gif file, sent as a data URL."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.serve.datasets import DatasetError, data_url

_MIME = {"libx264": "video/mp4", "libvpx-vp9": "video/webm", "gif": "image/gif"}


@dataclass(frozen=True)
class VideoSpec:
    """Clip size, length and rate, and the codec."""

    width: int = 320
    height: int = 240
    seconds: float = 4.0
    fps: float = 8.0
    codec: str = "libx264"

    def __post_init__(self) -> None:
        if self.codec not in _MIME:
            raise DatasetError(f"video codec {self.codec!r}: use one of {sorted(_MIME)}")
        if min(self.width, self.height) < 2 or self.seconds <= 0 or self.fps <= 0:
            raise DatasetError("video size must be at least 2x2, seconds and fps positive")
        if self.codec == "libx264" and (self.width % 2 or self.height % 2):
            raise DatasetError("h264 clips need even sides")


def parse_video_size(text: str) -> tuple[int, int]:
    """'320x240' -> (320, 240)."""
    width, sep, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        size = (0, 0)
    if not sep or min(size) < 2:
        raise DatasetError(f"bad video size {text!r}; use WxH, e.g. 320x240")
    return size


def random_clip(rng: np.random.Generator, spec: VideoSpec) -> str:
    """One distinct clip as a data URL."""
    from scripts.testkit.clips import encode_clip

    base = rng.integers(0, 256, size=3, dtype=np.uint8)
    speed = int(rng.integers(1, 6))
    frames = []
    for i in range(max(2, round(spec.seconds * spec.fps))):
        frame = np.empty((spec.height, spec.width, 3), np.uint8)
        frame[:] = (base.astype(np.int64) + i * speed) % 256
        bar = (i * speed * 4) % spec.width
        frame[:, bar : bar + max(1, spec.width // 10)] = 255 - base
        frames.append(frame)
    return data_url(encode_clip(frames, spec.fps, spec.codec), _MIME[spec.codec])


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}
