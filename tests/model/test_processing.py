"""Image decoding and preprocessing against transformers' Qwen2-VL image processor (PIL backend)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from shared.model.processing import (
    ImageError,
    ImageProcessorConfig,
    decode_image,
    mrope_positions,
    preprocess_image,
    smart_resize,
)
from tests.model.helpers import images_inputs, prompt_ids, random_image
from tests.tiny import IMAGE_TOKEN_ID

# Qwen3-VL's real limits, and smaller ones for the full pixel comparisons.
REAL = ImageProcessorConfig()
SMALL = ImageProcessorConfig(min_pixels=32 * 32, max_pixels=384 * 384)

SIZES = [  # (width, height)
    (1, 1),
    (1, 150),
    (150, 1),
    (2, 399),
    (399, 2),
    (16, 16),
    (31, 33),
    (32, 32),
    (33, 31),
    (100, 100),
    (640, 480),
    (480, 640),
    (1000, 5),
    (5, 999),
    (4000, 3000),
    (3000, 4000),
    (8000, 41),
    (41, 8000),
    (1920, 1080),
    (123, 457),
    (7, 1399),
    (256, 255),
]


def hf_processor(cfg: ImageProcessorConfig):
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
    )


@pytest.mark.parametrize("cfg", [REAL, SMALL], ids=["real-limits", "small-limits"])
def test_grid_matches_transformers(cfg):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_sr

    for w, h in SIZES:
        assert smart_resize(h, w, 32, cfg.min_pixels, cfg.max_pixels) == hf_sr(
            h, w, 32, cfg.min_pixels, cfg.max_pixels
        ), (w, h)


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_pixels_match_transformers(size):
    w, h = size
    image = random_image(w, h, seed=w * 7 + h)
    ours, grid = preprocess_image(image, SMALL)
    ref = hf_processor(SMALL)(images=[image], return_tensors="pt")
    assert list(grid) == ref["image_grid_thw"][0].tolist()
    assert ours.shape == ref["pixel_values"].shape
    assert (ours - ref["pixel_values"]).abs().max().item() <= 1e-5


def test_aspect_ratio_over_200_rejected():
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(1, 201, 32, REAL.min_pixels, REAL.max_pixels)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty"),
        (b"not an image at all", "cannot decode"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "cannot decode"),
    ],
)
def test_bad_bytes_rejected(data, match):
    with pytest.raises(ImageError, match=match):
        decode_image(data)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decompression_bomb_rejected():
    data = _encode(Image.new("L", (4000, 4000)), "PNG")
    with pytest.raises(ImageError, match="decode limit"):
        decode_image(data, max_decoded_pixels=1000 * 1000)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_formats_decode_to_rgb(fmt):
    img = decode_image(_encode(random_image(40, 30, 1), fmt))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_rgba_and_palette_to_rgb():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    assert decode_image(_encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 255] * 256)
    assert decode_image(_encode(pal, "PNG")).getpixel((0, 0)) == (0, 0, 255)


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue()).getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_honoured():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_mrope_positions_match_transformers(tiny_vl):
    _, hf = tiny_vl
    _, grid = images_inputs([(64, 160), (128, 96)], seed=3)
    ids = prompt_ids([4, 9, 6], grid.tolist(), seed=1)
    ours, delta = mrope_positions(ids, grid.tolist(), IMAGE_TOKEN_ID, 2)
    ref, ref_delta = hf.model.get_rope_index(
        ids[None], (ids == IMAGE_TOKEN_ID).int()[None], image_grid_thw=grid
    )
    assert torch.equal(ours, ref[:, 0])
    assert delta == int(ref_delta.view(-1)[0])


def test_mrope_pad_count_mismatch():
    ids = torch.tensor([1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 2])
    with pytest.raises(ValueError, match="pad tokens"):
        mrope_positions(ids, [(1, 4, 4)], IMAGE_TOKEN_ID, 2)


def test_patch_rows_in_merge_block_order():
    """A 2x2-patch-block image whose patches are constant colours lands in block order."""
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    arr[:16, 16:32] = 255  # patch (row 0, col 1)
    pv, grid = preprocess_image(Image.fromarray(arr), SMALL)
    assert grid == (1, 4, 4)
    bright = (pv.mean(1) > 0).nonzero().view(-1).tolist()
    assert bright == [1]  # (block 0, row-in-block 0, col-in-block 1)
