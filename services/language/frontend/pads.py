"""Pad expansion: each image's single `<|image_pad|>` in a rendered prompt becomes one pad per
language token of the image, and each video's placeholder becomes, per temporal group, its time
and its pads (transformers' Qwen3-VL processor's text)."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from shared.model.video import video_prompt
from shared.wire.images import EncodedImage


def expand_pads(
    token_ids: Sequence[int], pad_ids: int | Collection[int], counts: Sequence[int]
) -> tuple[int, ...]:
    """Replace the i-th pad (of any of `pad_ids`) by counts[i] of it; the prompt must hold
    exactly len(counts) pads."""
    pads = {pad_ids} if isinstance(pad_ids, int) else set(pad_ids)
    positions = [i for i, token in enumerate(token_ids) if token in pads]
    if len(positions) != len(counts):
        raise ValueError(f"{len(positions)} image pads in the prompt but {len(counts)} images")
    expanded: list[int] = []
    start = 0
    for position, count in zip(positions, counts, strict=True):
        expanded.extend(token_ids[start:position])
        expanded.extend([token_ids[position]] * count)
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


@dataclass(frozen=True)
class VideoMarkers:
    """The special-token texts of a video placeholder: `<|vision_start|>`, `<|video_pad|>`,
    `<|vision_end|>`; the chat template renders a video part as the three together."""

    start: str
    pad: str
    end: str

    @property
    def placeholder(self) -> str:
        return self.start + self.pad + self.end

    def render(self, text: str, timestamps: Sequence[Sequence[float]]) -> str:
        """`text` with the i-th placeholder replaced by video i's groups, one pad each."""
        pieces = text.split(self.placeholder)
        if len(pieces) - 1 != len(timestamps):
            raise ValueError(f"{len(pieces) - 1} video placeholders for {len(timestamps)} videos")
        out = [pieces[0]]
        for times, piece in zip(timestamps, pieces[1:], strict=True):
            out += [video_prompt(times, 1, self.pad, self.start, self.end), piece]
        return "".join(out)


def media_images(encoded: Sequence[EncodedImage]) -> list[EncodedImage]:
    """What the engine takes for a prompt's images and videos (in prompt order): an image as it
    is, each temporal group of a video as a picture of its own."""
    return [group for item in encoded for group in item.groups()]
