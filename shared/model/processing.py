"""Image decoding and preprocessing for Qwen3-VL, and M-RoPE position ids.

Matches transformers' Qwen2-VL image processor with its PIL backend and Qwen3-VL's values (patch 16,
merge 2, temporal patch 2, mean = std = 0.5).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_ASPECT_RATIO = 200
# Refuse to decode images whose header claims more pixels than this (decompression bombs).
DEFAULT_MAX_DECODED_PIXELS = 8192 * 8192


class ImageError(ValueError):
    """An image cannot be used: empty, undecodable, too large, or of an unsupported shape."""


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The preprocessor_config.json values that matter."""

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def with_pixel_limits(
        self, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> ImageProcessorConfig:
        """A copy with per-request pixel limits (None keeps the checkpoint's)."""
        from dataclasses import replace

        return replace(
            self,
            min_pixels=self.min_pixels if min_pixels is None else min_pixels,
            max_pixels=self.max_pixels if max_pixels is None else max_pixels,
        )


def load_image_processor_config(model_dir: str | Path) -> ImageProcessorConfig:
    """Read `preprocessor_config.json`; `size.shortest_edge/longest_edge` or min/max_pixels."""
    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no preprocessor_config.json in {model_dir}")
    raw = json.loads(path.read_text())
    size = raw.get("size") or {}
    default = ImageProcessorConfig()
    return ImageProcessorConfig(
        patch_size=int(raw.get("patch_size", default.patch_size)),
        merge_size=int(raw.get("merge_size", default.merge_size)),
        temporal_patch_size=int(raw.get("temporal_patch_size", default.temporal_patch_size)),
        min_pixels=int(raw.get("min_pixels") or size.get("shortest_edge") or default.min_pixels),
        max_pixels=int(raw.get("max_pixels") or size.get("longest_edge") or default.max_pixels),
        image_mean=tuple(float(v) for v in raw.get("image_mean", default.image_mean)),
        image_std=tuple(float(v) for v in raw.get("image_std", default.image_std)),
        rescale_factor=float(raw.get("rescale_factor", default.rescale_factor)),
    )


def decode_image(data: bytes, max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS) -> Image.Image:
    """Decode JPEG / PNG / WebP / GIF (first frame) bytes to RGB, honouring EXIF orientation."""
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_decoded_pixels:
                raise ImageError(
                    f"image is {img.width}x{img.height} = {img.width * img.height} pixels, over "
                    f"the decode limit of {max_decoded_pixels}"
                )
            img.seek(0)
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image rejected as a decompression bomb: {e}") from e
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageError(f"cannot decode image: {e}") from e
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        # Palette and alpha images: composite over white like most viewers do, then drop alpha.
        if img.mode in ("RGBA", "LA", "P", "PA"):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert("RGB")
    return img


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Target size: sides multiples of `factor`, area within [min_pixels, max_pixels], aspect
    kept."""
    if height <= 0 or width <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"aspect ratio {ratio:.1f} of a {width}x{height} image exceeds {MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(pixels: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """[C, H, W] float32 -> [gh*gw, C*T*P*P] rows in merge-block order, the frame repeated over
    T."""
    c, h, w = pixels.shape
    p, m = cfg.patch_size, cfg.merge_size
    gh, gw = h // p, w // p
    x = pixels.reshape(c, gh // m, m, p, gw // m, m, p)
    x = np.transpose(x, (1, 4, 2, 5, 0, 3, 6))  # (bh, bw, mh, mw, C, ph, pw)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], cfg.temporal_patch_size, p, p))
    return np.ascontiguousarray(x).reshape(gh * gw, c * cfg.temporal_patch_size * p * p)


def preprocess_image(
    image: Image.Image, cfg: ImageProcessorConfig
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Resize (bicubic), rescale, normalize and patchify one RGB image -> (pixel_values,
    grid_thw)."""
    h, w = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if (w, h) != image.size:
        image = image.resize((w, h), resample=Image.BICUBIC)
    arr = (np.asarray(image, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    arr = ((arr - mean) / std).transpose(2, 0, 1)  # [C, H, W]
    grid = (1, h // cfg.patch_size, w // cfg.patch_size)
    return torch.from_numpy(patchify(arr, cfg)), grid


def num_image_tokens(grid_thw: tuple[int, int, int], merge_size: int) -> int:
    """Language tokens of one image: t * h * w / merge^2."""
    t, h, w = grid_thw
    return t * h * w // (merge_size * merge_size)


def pad_positions(token_ids, pad_ids: int | Collection[int]) -> list[int]:
    """Positions of the vision pad tokens (one id, or several: image and video pads)."""
    ids = {pad_ids} if isinstance(pad_ids, int) else set(pad_ids)
    return [i for i, t in enumerate(token_ids) if t in ids]


def mrope_positions(
    input_ids: list[int] | torch.Tensor,
    grid_thws: list[tuple[int, int, int]],
    pad_ids: int | Collection[int],
    merge_size: int,
) -> tuple[torch.Tensor, int]:
    """M-RoPE position ids [3, T] (t, h, w) and the rope delta for decoding.

    Text tokens at running position p get (p, p, p). The i-th run of pad tokens (an image, or
    one temporal group of a video as a (1, h, w) grid) starts at s and gets (s + frame, s + row,
    s + col) over its merged grid in raster order; the running position then continues at
    s + max(t, gh/m, gw/m). rope_delta = max position + 1 - T.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).view(-1)
    num_tokens = ids.numel()
    pad_idx = pad_positions(ids.tolist(), pad_ids)
    expected = sum(num_image_tokens(g, merge_size) for g in grid_thws)
    if len(pad_idx) != expected:
        raise ValueError(
            f"{len(pad_idx)} image pad tokens in the prompt but the images need {expected}"
        )
    positions = torch.empty(3, num_tokens, dtype=torch.long)
    cursor, pos, pad_i = 0, 0, 0
    for t, h, w in grid_thws:
        n = num_image_tokens((t, h, w), merge_size)
        start = pad_idx[pad_i]
        if pad_idx[pad_i + n - 1] != start + n - 1:
            raise ValueError("an image's pad tokens must be contiguous")
        text_len = start - cursor
        positions[:, cursor:start] = torch.arange(pos, pos + text_len)
        s = pos + text_len
        gh, gw = h // merge_size, w // merge_size
        frame = torch.arange(t).view(t, 1, 1).expand(t, gh, gw).reshape(-1)
        row = torch.arange(gh).view(1, gh, 1).expand(t, gh, gw).reshape(-1)
        col = torch.arange(gw).view(1, 1, gw).expand(t, gh, gw).reshape(-1)
        positions[:, start : start + n] = torch.stack([frame, row, col]) + s
        pos = s + max(t, gh, gw)
        cursor = start + n
        pad_i += n
    positions[:, cursor:] = torch.arange(pos, pos + num_tokens - cursor)
    rope_delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, rope_delta


def grids_in_prompt_order(
    input_ids,
    image_grids: list[tuple[int, int, int]],
    video_grids: list[tuple[int, int, int]],
    image_token_id: int,
    video_token_id: int,
    merge_size: int,
) -> list[tuple[int, int, int]]:
    """The grids of a prompt's pad runs in order: each image's, and each temporal group of each
    video as a (1, h, w) grid (what `mrope_positions` takes)."""
    images = iter(image_grids)
    groups = iter([(1, h, w) for t, h, w in video_grids for _ in range(t)])
    ids = [int(t) for t in input_ids]
    grids, i = [], 0
    while i < len(ids):
        source = {image_token_id: images, video_token_id: groups}.get(ids[i])
        if source is None:
            i += 1
            continue
        grid = next(source, None)
        if grid is None:
            raise ValueError("the prompt has more image or video pad runs than grids")
        grids.append(grid)
        i += num_image_tokens(grid, merge_size)
    return grids
