"""Image pad expansion: one pad per language token of each image, counts checked."""

from __future__ import annotations

import pytest
import torch

from services.language.frontend.pads import expand_pads, image_token_counts
from shared.wire.images import EncodedImage


def _image(grid_thw: tuple[int, int, int], merge: int = 2, hidden: int = 4, k: int = 2):
    n = grid_thw[0] * grid_thw[1] * grid_thw[2] // (merge * merge)
    return EncodedImage(torch.zeros(n, (1 + k) * hidden), grid_thw, "hash")


def test_pads_expand_in_order_to_each_images_token_count():
    pad = 9
    ids = [1, pad, 2, 3, pad, 4]
    images = [_image((1, 4, 4)), _image((1, 2, 6))]  # 4 tokens, then 3
    counts = image_token_counts(images, merge_size=2)
    assert counts == [4, 3]
    assert expand_pads(ids, pad, counts) == (
        1,
        pad,
        pad,
        pad,
        pad,
        2,
        3,
        pad,
        pad,
        pad,
        4,
    )


def test_pad_and_row_counts_are_checked():
    with pytest.raises(ValueError, match="2 image pads in the prompt but 1 images"):
        expand_pads([9, 9], 9, image_token_counts([_image((1, 2, 2))], merge_size=2))
    bad = EncodedImage(torch.zeros(3, 4), (1, 4, 4), "hash")
    with pytest.raises(ValueError, match="means 4 tokens"):
        image_token_counts([bad], merge_size=2)
