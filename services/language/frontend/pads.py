"""Image pad expansion: each image's single `<|image_pad|>` in a rendered prompt becomes one pad
per language token of the image."""

from __future__ import annotations

from collections.abc import Sequence

from shared.wire.images import EncodedImage


def expand_pads(token_ids: Sequence[int], pad_id: int, counts: Sequence[int]) -> tuple[int, ...]:
    """Replace the i-th pad by counts[i] pads; the prompt must hold exactly len(counts) pads."""
    positions = [i for i, token in enumerate(token_ids) if token == pad_id]
    if len(positions) != len(counts):
        raise ValueError(f"{len(positions)} image pads in the prompt but {len(counts)} images")
    expanded: list[int] = []
    start = 0
    for position, count in zip(positions, counts, strict=True):
        expanded.extend(token_ids[start:position])
        expanded.extend([pad_id] * count)
        start = position + 1
    expanded.extend(token_ids[start:])
    return tuple(expanded)


def image_token_counts(images: Sequence[EncodedImage], merge_size: int) -> list[int]:
    """Language tokens of each encoded image: t*h*w / merge**2, which must equal the rows of its
    embeddings (a replica with another merge size would otherwise misplace every image)."""
    counts = []
    for image in images:
        t, h, w = image.grid_thw
        num_tokens = t * h * w // (merge_size * merge_size)
        if num_tokens != image.num_tokens:
            raise ValueError(
                f"image grid {image.grid_thw} means {num_tokens} tokens at merge size "
                f"{merge_size}, but its embeddings have {image.num_tokens} rows"
            )
        counts.append(num_tokens)
    return counts
