"""Synthetic shapes clips with unambiguous questions: shapes that appear one after another.

A clip shows one to three shapes in turn, one at a time on a fixed background (the scene
renderer's shapes and backgrounds), each for at least 1.2 seconds; the shapes of a clip have
distinct colours. Questions: which colour appears first, how many shapes appear, what shape
appears last.

The model sees a clip as the video processor samples it (about 2 frames a second, see
`video_preprocessor_config.json`), two sampled frames fused into each temporal group. A clip is
kept only if every shape fills both frames of at least one group under that sampling, so each
answer is visible in the sampled frames; groups at a change of shape mix two shapes. Clips are
encoded to mp4 (h264) and decoded back through `shared.model.video_decode.load_video`, the
services' path, so the model sees the codec's losses in training and evaluation alike.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from PIL import Image, ImageDraw

from scripts.shapes_vl.data import (
    BACKGROUNDS,
    COLORS,
    COUNT_WORDS,
    MAX_SCENE_TRIES,
    SHAPES,
    DataError,
    Shape,
    _draw_shape,
    _jitter,
)
from scripts.shapes_vl.modelcfg import SmallModelConfig
from shared.model.video import VideoProcessorConfig, sample_indices

VIDEO_KINDS = ("first_color", "count", "last_shape")
VIDEO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "first_color": ("Which colour appears first?", "Which color appears first?"),
    "count": ("How many shapes appear?", "How many shapes appear in the video?"),
    "last_shape": ("What shape appears last?", "Which shape appears last?"),
}
CLIP_FPS = (4.0, 5.0, 6.0, 8.0)
# Frame sides (even, for h264) and the clip's length; each shape shows at least MIN_SEGMENT_S.
MIN_FRAME_SIDE, MAX_FRAME_SIDE, MAX_FRAME_ASPECT = 96, 144, 1.5
MIN_CLIP_S, MAX_CLIP_S, MIN_SEGMENT_S = 2.0, 6.0, 1.2
SIZE_FRAC = (0.3, 0.5)  # shape size as a fraction of the frame's shorter side


def video_processor_config(cfg: SmallModelConfig | None = None) -> VideoProcessorConfig:
    """The sampling and resizing the shipped `video_preprocessor_config.json` describes."""
    cfg = cfg or SmallModelConfig()
    return VideoProcessorConfig(
        patch_size=cfg.patch_size,
        merge_size=cfg.spatial_merge_size,
        temporal_patch_size=cfg.temporal_patch_size,
        min_pixels=cfg.video_min_pixels,
        max_pixels=cfg.video_max_pixels,
        fps=cfg.video_fps,
        min_frames=cfg.video_min_frames,
        max_frames=cfg.video_max_frames,
    )


@dataclass(frozen=True)
class Segment:
    """One shape on screen for frames [start, end)."""

    shape: Shape
    start: int
    end: int


@dataclass(frozen=True)
class Clip:
    """A clip's content: frame size, rate, background and its shapes in order."""

    width: int
    height: int
    fps: float
    num_frames: int
    background: tuple[int, int, int]
    noisy: bool
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class VideoExample:
    """A clip (mp4 bytes), a question about it and its one right answer."""

    data: bytes
    question: str
    answer: str
    kind: str
    clip: Clip


def pure_groups(clip: Clip, cfg: VideoProcessorConfig) -> list[int | None]:
    """Per temporal group of the sampled clip: the segment both its frames show, or None."""
    indices = [int(i) for i in sample_indices(clip.num_frames, clip.fps, cfg)]
    if pad := -len(indices) % cfg.temporal_patch_size:
        indices += [indices[-1]] * pad
    owner = np.empty(clip.num_frames, dtype=int)
    for i, seg in enumerate(clip.segments):
        owner[seg.start : seg.end] = i
    step = cfg.temporal_patch_size
    out: list[int | None] = []
    for k in range(0, len(indices), step):
        segs = {int(owner[i]) for i in indices[k : k + step]}
        out.append(segs.pop() if len(segs) == 1 else None)
    return out


def _random_shape(rng: random.Random, width: int, height: int, color: str) -> Shape:
    half = rng.uniform(*SIZE_FRAC) * min(width, height) / 2
    cx = rng.uniform(half + 1, width - half - 1)
    cy = rng.uniform(half + 1, height - half - 1)
    return Shape(rng.choice(SHAPES), color, cx, cy, half)


def _even_side(rng: random.Random, low: int, high: int) -> int:
    return 2 * rng.randint(-(-low // 2), high // 2)


def random_clip(
    rng: random.Random, num_shapes: int | None = None, cfg: VideoProcessorConfig | None = None
) -> Clip:
    """A random clip whose every shape fills at least one sampled temporal group."""
    if num_shapes is not None and not 1 <= num_shapes <= 3:
        raise DataError(f"num_shapes must be 1, 2 or 3, got {num_shapes}")
    cfg = cfg or video_processor_config()
    for _ in range(MAX_SCENE_TRIES):
        width = _even_side(rng, MIN_FRAME_SIDE, MAX_FRAME_SIDE)
        low = max(MIN_FRAME_SIDE, int(width / MAX_FRAME_ASPECT) + 1)
        height = _even_side(rng, low, min(MAX_FRAME_SIDE, int(width * MAX_FRAME_ASPECT)))
        fps = rng.choice(CLIP_FPS)
        count = num_shapes or rng.randint(1, 3)
        seconds = rng.uniform(max(MIN_CLIP_S, count * MIN_SEGMENT_S), MAX_CLIP_S)
        min_len = round(MIN_SEGMENT_S * fps)
        num_frames = max(round(seconds * fps), count * min_len)
        # Cut points: each segment at least min_len frames long.
        spare = num_frames - count * min_len
        cuts = sorted(rng.randint(0, spare) for _ in range(count - 1))
        bounds = [0] + [c + (i + 1) * min_len for i, c in enumerate(cuts)] + [num_frames]
        colors = rng.sample(list(COLORS), count)
        segments = tuple(
            Segment(_random_shape(rng, width, height, colors[i]), bounds[i], bounds[i + 1])
            for i in range(count)
        )
        clip = Clip(
            width,
            height,
            fps,
            num_frames,
            rng.choice(BACKGROUNDS),
            rng.random() < 0.5,
            segments,
        )
        if set(pure_groups(clip, cfg)) >= set(range(count)):
            return clip
    raise DataError(f"no clip of {num_shapes} shapes in {MAX_SCENE_TRIES} tries")


def render_clip(clip: Clip, rng: random.Random) -> np.ndarray:
    """The clip's frames, uint8 [T, H, W, 3] (shades and background noise drawn from `rng`)."""
    base = np.empty((clip.height, clip.width, 3), dtype=np.float32)
    base[:] = clip.background
    if clip.noisy:
        noise_rng = np.random.default_rng(rng.getrandbits(32))
        base += noise_rng.normal(0.0, 18.0, size=base.shape).astype(np.float32)
    background = np.clip(base, 0, 255).astype(np.uint8)
    frames = np.empty((clip.num_frames, clip.height, clip.width, 3), dtype=np.uint8)
    for seg in clip.segments:
        image = Image.fromarray(background, "RGB")
        _draw_shape(ImageDraw.Draw(image), seg.shape, _jitter(rng, COLORS[seg.shape.color], 15))
        frames[seg.start : seg.end] = np.asarray(image)
    return frames


def video_question_for(kind: str, clip: Clip, rng: random.Random) -> tuple[str, str]:
    """A (question, answer) of this kind; every kind has one right answer for every clip."""
    if kind not in VIDEO_KINDS:
        raise DataError(f"unknown video question kind {kind!r}; expected one of {VIDEO_KINDS}")
    template = rng.choice(VIDEO_TEMPLATES[kind])
    if kind == "first_color":
        return template, clip.segments[0].shape.color
    if kind == "count":
        return template, COUNT_WORDS[len(clip.segments)]
    return template, clip.segments[-1].shape.kind


def encode_mp4(frames: np.ndarray, fps: float) -> bytes:
    """The frames as an h264 mp4 (yuv420p), as a client would send the clip.

    As `scripts.testkit.clips.encode_clip`, but deterministic: with x264's defaults the same
    frames now and then come out as different bytes within one process (pixels up to ~10
    levels apart after decoding, from the second scene on), which the macroblock-tree rate
    control (`mbtree=0` here) turned out to cause; each frame is also converted to yuv420p
    before it reaches the encoder."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        rate = Fraction(fps).limit_denominator(1001)
        stream = out.add_stream("libx264", rate=rate, options={"x264-params": "mbtree=0"})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # threaded x264 output varies with the load
        for picture in frames:
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format="yuv420p")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def make_video_conversation(
    rng: random.Random, num_turns: int, max_shapes: int = 3, first_kind: str | None = None
) -> list[VideoExample]:
    """Up to `num_turns` questions of distinct kinds about one clip (the first of `first_kind`,
    random when None); they share the clip's bytes."""
    if num_turns < 1:
        raise DataError(f"num_turns must be >= 1, got {num_turns}")
    if not 1 <= max_shapes <= 3:
        raise DataError(f"max_shapes must be 1, 2 or 3, got {max_shapes}")
    first_kind = first_kind or rng.choice(VIDEO_KINDS)
    clip = random_clip(rng, rng.randint(1, max_shapes))
    data = encode_mp4(render_clip(clip, rng), clip.fps)
    others = [k for k in rng.sample(VIDEO_KINDS, len(VIDEO_KINDS)) if k != first_kind]
    kinds = [first_kind, *others][:num_turns]
    return [VideoExample(data, *video_question_for(k, clip, rng), k, clip) for k in kinds]


def make_video_dataset(seed: int, n: int) -> list[VideoExample]:
    """`n` one-question clips, deterministic for `seed`, kinds cycling so each is as common."""
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [
        make_video_conversation(rng, 1, first_kind=VIDEO_KINDS[i % len(VIDEO_KINDS)])[0]
        for i in range(n)
    ]
