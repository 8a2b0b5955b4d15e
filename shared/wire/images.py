"""Image descriptors and encoded images: what the language side asks for and what it gets back."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch

from shared.wire.errors import ImageRefError
from shared.wire.packed import separate_deepstack_embeds

_HASH = re.compile(r"^[0-9a-f]{64}$")


def content_hash(data: bytes) -> str:
    """sha256 hex digest: the content hash of an image on the wire and in the caches."""
    return hashlib.sha256(data).hexdigest()


def normalize_hash(value: str) -> str:
    """Lower-case sha256 hex, or ImageRefError."""
    value = value.strip().lower()
    if not _HASH.match(value):
        raise ImageRefError(f"content_hash {value[:80]!r} is not a sha256 hex digest")
    return value


@dataclass(frozen=True)
class VideoSampling:
    """How a video is sampled (a request's `mm_processor_kwargs`); None keeps the processor's
    value. Part of what determines the embeddings, so caches key on it too."""

    fps: float | None = None
    num_frames: int | None = None
    cap_pixels_per_frame: bool | None = None
    frames_fps: float | None = None  # the rate of a video sent as image frames

    def __post_init__(self) -> None:
        if self.fps is not None and self.num_frames is not None:
            raise ImageRefError("fps and num_frames are mutually exclusive: give one")
        for name in ("fps", "frames_fps"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ImageRefError(f"{name} must be a positive number, got {value}")
        if self.num_frames is not None and self.num_frames < 2:
            raise ImageRefError(f"num_frames must be at least 2, got {self.num_frames}")

    def key(self) -> str:
        return (
            f"fps={self.fps},n={self.num_frames},cap={self.cap_pixels_per_frame},"
            f"frames_fps={self.frames_fps}"
        )


@dataclass(frozen=True)
class ImageRef:
    """One image to encode: its bytes, a URL, or only the content hash of an image sent before.

    `min_pixels` / `max_pixels` bound the resize (None: the encode replica's defaults); they are
    part of what determines the embeddings, so caches key on them too. With `video` set it is a
    video clip (its bytes or URL, or `frames`: image files, one per frame), the pixel bounds a
    budget over the whole sampled clip.
    """

    data: bytes | None = None
    url: str | None = None
    content_hash: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    video: VideoSampling | None = None
    frames: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.data is not None and self.url is not None:
            raise ImageRefError("give an image's data or its url, not both")
        if self.frames and (self.data is not None or self.url is not None):
            raise ImageRefError("give a video's data, url or frames, one of them")
        if self.frames and (self.video is None or self.video.frames_fps is None):
            raise ImageRefError("a video sent as frames needs its frame rate (frames_fps)")
        if self.data is None and self.url is None and not self.frames and not self.content_hash:
            raise ImageRefError("an image needs data, a url or a content_hash")
        for name in ("min_pixels", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ImageRefError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class EncodedImage:
    """One image's packed embeddings `[num_tokens, (1+k)*H]`: `cat([embeds, ds_0..ds_{k-1}], 1)`.

    The packed tensor is the unit that travels: from the vision tower through the wire into the
    language engine's step inputs, it is never split into separate tensors or re-packed; readers
    take views (`split`). A tensor received inline may view the received message: read-only.
    """

    packed: torch.Tensor
    grid_thw: tuple[int, int, int]
    content_hash: str
    cache_hit: bool = False
    source: str = ""  # the replica that encoded it (diagnostics only)
    # A video's: the time in seconds of each temporal group (grid_thw[0] of them), which the
    # prompt states before the group's tokens; empty for an image
    timestamps: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.packed.dim() != 2:
            raise ImageRefError(
                f"packed embeddings must be [n, (1+k)*H], got {tuple(self.packed.shape)}"
            )
        if len(self.grid_thw) != 3 or any(int(x) < 1 for x in self.grid_thw):
            raise ImageRefError(f"grid_thw must be three positive ints, got {self.grid_thw!r}")
        if not self.content_hash:
            raise ImageRefError("an encoded image needs its content_hash")
        if self.timestamps and len(self.timestamps) != self.grid_thw[0]:
            raise ImageRefError(
                f"a video of {self.grid_thw[0]} temporal groups with {len(self.timestamps)} "
                "timestamps"
            )

    @property
    def is_video(self) -> bool:
        return bool(self.timestamps)

    @property
    def num_tokens(self) -> int:
        return int(self.packed.shape[0])

    def split(self, num_deepstack: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds `[n, H]`, deepstack `[n, k*H]`) views of the packed tensor."""
        try:
            return separate_deepstack_embeds(self.packed, num_deepstack)
        except ValueError as exc:
            raise ImageRefError(str(exc)) from exc

    def groups(self) -> tuple[EncodedImage, ...]:
        """A video as the language model takes it: each temporal group a (1, h, w) picture of
        its own (views of the packed rows), hashed by the clip, the group's place and time."""
        if not self.is_video:
            return (self,)
        t, h, w = self.grid_thw
        rows = self.num_tokens // t
        return tuple(
            EncodedImage(
                self.packed[g * rows : (g + 1) * rows],
                (1, h, w),
                group_hash(self.content_hash, self.grid_thw, g, time),
                self.cache_hit,
                self.source,
            )
            for g, time in enumerate(self.timestamps)
        )


def group_hash(video_hash: str, grid_thw: tuple[int, int, int], group: int, time: float) -> str:
    """The content hash of one temporal group of a video, as a picture of its own."""
    return content_hash(f"{video_hash}|{tuple(grid_thw)}|{group}|{time!r}".encode())


def frames_hash(frames: tuple[bytes, ...]) -> str:
    """The content hash of a video sent as image files: the hash of its frames' hashes."""
    return content_hash("".join(content_hash(frame) for frame in frames).encode())


@dataclass(frozen=True)
class PendingImage:
    """An image (or one temporal group of a video) whose embeddings are still on their way: its
    grid and row count (its pads are in the prompt already) and its content hash (so prefix-cache
    keys are known). The engine computes the prompt up to its first pad until it arrives."""

    grid_thw: tuple[int, int, int]
    num_tokens: int
    content_hash: str

    def accepts(self, image: EncodedImage) -> bool:
        """Whether `image` is the one this placeholder stands for."""
        same_grid = tuple(image.grid_thw) == tuple(self.grid_thw)
        return same_grid and image.num_tokens == self.num_tokens
