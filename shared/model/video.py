"""Video preprocessing for Qwen3-VL, as transformers' `Qwen3VLVideoProcessor` computes it.

Frames are sampled uniformly at `fps` (or `num_frames`), resized together within the clip's
pixel budget (a budget over the whole clip volume, t x h x w, unless `cap_pixels_per_frame`
caps each frame as the reference `qwen-vl-utils` does), normalized, and cut into patches two
frames deep: `grid_thw = (ceil(frames / 2), h / 16, w / 16)`. Each temporal group is one
(1, h, w) picture to the language model, announced in the prompt by the time of its frames
(`<1.4 seconds>`), which is why the sampled frame indices and the clip's own fps travel with
the embeddings.

The resize is torch's antialiased bicubic on uint8 frames, which is what torchvision runs on a
CPU (transformers' video path), not PIL's: the two differ by up to a few levels per pixel.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shared.model.processing import MAX_ASPECT_RATIO
from shared.wire.images import VideoSampling


class VideoError(ValueError):
    """A video cannot be used: undecodable, empty, too long or large, or bad sampling options."""


@dataclass(frozen=True)
class VideoProcessorConfig:
    """`video_preprocessor_config.json` values (the class defaults of transformers' processor
    where a key is missing)."""

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 128 * 32 * 32  # size.shortest_edge: pixels of the whole clip, not a side
    max_pixels: int = 768 * 32 * 32  # size.longest_edge
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768  # the per-frame token ceiling of the cap
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def apply_sampling(
    cfg: VideoProcessorConfig,
    sampling: VideoSampling,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> VideoProcessorConfig:
    """The processor config one request runs with (None keeps the processor's value)."""
    cap = sampling.cap_pixels_per_frame
    return replace(
        cfg,
        fps=cfg.fps if sampling.fps is None else sampling.fps,
        min_pixels=cfg.min_pixels if min_pixels is None else min_pixels,
        max_pixels=cfg.max_pixels if max_pixels is None else max_pixels,
        cap_pixels_per_frame=cfg.cap_pixels_per_frame if cap is None else cap,
    )


def load_video_processor_config(model_dir: str | Path) -> VideoProcessorConfig:
    """`video_preprocessor_config.json` if the checkpoint has one, else the class defaults
    with the image processor's patch, merge and normalization values."""
    model_dir = Path(model_dir)
    default = VideoProcessorConfig()
    path = model_dir / "video_preprocessor_config.json"
    raw = json.loads(path.read_text()) if path.is_file() else {}
    if not raw and (model_dir / "preprocessor_config.json").is_file():
        image = json.loads((model_dir / "preprocessor_config.json").read_text())
        raw = {
            k: image[k] for k in ("patch_size", "merge_size", "temporal_patch_size") if k in image
        }
    size = raw.get("size") or {}
    return VideoProcessorConfig(
        patch_size=int(raw.get("patch_size", default.patch_size)),
        merge_size=int(raw.get("merge_size", default.merge_size)),
        temporal_patch_size=int(raw.get("temporal_patch_size", default.temporal_patch_size)),
        min_pixels=int(size.get("shortest_edge") or default.min_pixels),
        max_pixels=int(size.get("longest_edge") or default.max_pixels),
        fps=float(raw.get("fps") or default.fps),
        min_frames=int(raw.get("min_frames", default.min_frames)),
        max_frames=int(raw.get("max_frames", default.max_frames)),
        cap_pixels_per_frame=bool(raw.get("cap_pixels_per_frame") or False),
        max_video_tokens=int(raw.get("max_video_tokens", default.max_video_tokens)),
        image_mean=tuple(float(v) for v in raw.get("image_mean", default.image_mean)),
        image_std=tuple(float(v) for v in raw.get("image_std", default.image_std)),
    )


def sample_indices(
    total: int, video_fps: float, cfg: VideoProcessorConfig, num_frames: int | None = None
) -> np.ndarray:
    """Frame indices to keep: `int(total / video_fps * fps)` frames clamped to [min_frames,
    max_frames] and the clip's length, or exactly `num_frames` (repeating frames when the clip
    is shorter), spread evenly and rounded half to even as numpy rounds."""
    if total < 1:
        raise VideoError("the video has no frames")
    if num_frames is None:
        n = int(total / video_fps * cfg.fps)
        n = min(max(n, cfg.min_frames), cfg.max_frames, total)
    else:
        n = num_frames
    return np.linspace(0, total - 1, n).round().astype(int)


def smart_resize_video(
    num_frames: int, height: int, width: int, cfg: VideoProcessorConfig
) -> tuple[int, int]:
    """Frame size: sides multiples of 32, the clip volume within the pixel budget."""
    tf, factor = cfg.temporal_patch_size, cfg.factor
    if num_frames < tf:
        raise VideoError(f"a video needs at least {tf} sampled frames, got {num_frames}")
    max_pixels = cfg.max_pixels
    if cfg.cap_pixels_per_frame:
        frame_cap = cfg.max_video_tokens * factor * factor
        per_frame = max(min(frame_cap, cfg.max_pixels // num_frames), int(cfg.min_pixels * 1.05))
        max_pixels = per_frame * num_frames
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise VideoError(f"aspect ratio of {width}x{height} frames exceeds {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / tf) * tf
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_grid(num_frames: int, height: int, width: int, cfg: VideoProcessorConfig):
    """(grid_t, grid_h, grid_w) of `num_frames` sampled frames of height x width."""
    h, w = smart_resize_video(num_frames, height, width, cfg)
    t = -(-num_frames // cfg.temporal_patch_size)
    return t, h // cfg.patch_size, w // cfg.patch_size


def group_timestamps(indices, video_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds of each temporal group: the mean time of its first and last frame (an odd last
    group repeats the last frame), in the clip's own frame numbering and fps."""
    idx = [int(i) for i in indices]
    if pad := -len(idx) % temporal_patch_size:
        idx += [idx[-1]] * pad
    times = [i / video_fps for i in idx]
    step = temporal_patch_size
    return [(times[k] + times[k + step - 1]) / 2 for k in range(0, len(times), step)]


def preprocess_video(
    frames: np.ndarray | torch.Tensor, cfg: VideoProcessorConfig
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Sampled uint8 frames [T, H, W, 3] -> (pixel rows [t*h*w, 3*2*16*16], grid_thw)."""
    x = torch.as_tensor(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()
    if x.dtype != torch.uint8 or x.shape[1] != 3:
        raise VideoError(f"frames must be uint8 [T, H, W, 3], got {x.dtype} {tuple(frames.shape)}")
    num_frames, channels, height, width = x.shape
    h, w = smart_resize_video(num_frames, height, width, cfg)
    if (h, w) != (height, width):
        x = F.interpolate(x, size=[h, w], mode="bicubic", align_corners=False, antialias=True)
    scale = torch.tensor(cfg.image_std, dtype=torch.float32).view(-1, 1, 1) * 255.0
    shift = torch.tensor(cfg.image_mean, dtype=torch.float32).view(-1, 1, 1) * 255.0
    x = (x.to(torch.float32) - shift) / scale  # rescale and normalize fused, as transformers
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if pad := -num_frames % tp:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // tp, h // p, w // p
    rows = x.view(gt, tp, channels, gh // m, m, p, gw // m, m, p)
    rows = rows.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, block row, block col, in-block, C, tp
    return rows.reshape(gt * gh * gw, channels * tp * p * p), (gt, gh, gw)


def video_prompt(timestamps, tokens_per_group: int, pad: str, start: str, end: str) -> str:
    """What one video's placeholder becomes in the prompt: per temporal group its time, then
    its pads between vision start and end (transformers' Qwen3-VL processor's text)."""
    return "".join(f"<{t:.1f} seconds>{start}{pad * tokens_per_group}{end}" for t in timestamps)
