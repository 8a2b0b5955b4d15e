"""Prompt and image builders shared by the model tests."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from shared.model.processing import ImageProcessorConfig, num_image_tokens, preprocess_image
from tests.tiny import IMAGE_TOKEN_ID, PREPROCESSOR, VISION_END_ID, VISION_START_ID

PROC = ImageProcessorConfig(
    min_pixels=PREPROCESSOR["size"]["shortest_edge"],
    max_pixels=PREPROCESSOR["size"]["longest_edge"],
)


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def images_inputs(sizes: list[tuple[int, int]], seed: int = 0):
    """pixel_values [N, 1536] and grid_thw [n, 3] for random images of the given (w, h) sizes."""
    pvs, grids = [], []
    for i, (w, h) in enumerate(sizes):
        pv, grid = preprocess_image(random_image(w, h, seed + i), PROC)
        pvs.append(pv)
        grids.append(grid)
    return torch.cat(pvs), torch.tensor(grids)


def prompt_ids(
    text_runs: list[int], grids: list[tuple[int, int, int]], seed: int = 0
) -> torch.Tensor:
    """Text runs of random ids interleaved with image blocks: text0 [img0] text1 [img1] ...
    textN."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for i, n in enumerate(text_runs):
        parts.append(torch.randint(0, 290, (n,), generator=gen))
        if i < len(grids):
            pads = torch.full((num_image_tokens(tuple(grids[i]), 2),), IMAGE_TOKEN_ID)
            parts.append(
                torch.cat([torch.tensor([VISION_START_ID]), pads, torch.tensor([VISION_END_ID])])
            )
    return torch.cat(parts)


@torch.no_grad()
def hf_logits(hf_model, ids: torch.Tensor, pixel_values=None, grid_thw=None) -> torch.Tensor:
    kwargs = {}
    if pixel_values is not None:
        kwargs = dict(
            pixel_values=pixel_values,
            image_grid_thw=grid_thw,
            mm_token_type_ids=(ids == IMAGE_TOKEN_ID).long()[None],
        )
    return hf_model(input_ids=ids[None], **kwargs).logits[0]
