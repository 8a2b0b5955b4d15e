"""Token sequences and padded batches with clips, in the Qwen3-VL chat format, and batches mixing
image and video conversations.

The chat template renders a video part as `<|vision_start|><|video_pad|><|vision_end|>`; as
transformers' Qwen3-VL processor does, that becomes, per temporal group of the sampled clip,
its time and its pads: `<0.3 seconds><|vision_start|><|video_pad|>*n<|vision_end|>...`
(`shared.model.video.video_prompt`). The rest of the conversation is the image format's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from tokenizers import Tokenizer

from scripts.shapes_vl.prompts import (
    IGNORE_INDEX,
    SpecialIds,
    Turn,
    conversation_ids,
    turns_ids,
)
from shared.model.video import video_prompt

VIDEO_PAD = "<|video_pad|>"


def video_prompt_text(question: str, timestamps: Sequence[float], tokens_per_group: int) -> str:
    """The rendered text of a one-clip user turn plus the assistant generation prompt."""
    video = video_prompt(
        timestamps, tokens_per_group, VIDEO_PAD, "<|vision_start|>", "<|vision_end|>"
    )
    return f"<|im_start|>user\n{video}{question}<|im_end|>\n<|im_start|>assistant\n"


def video_prompt_ids(
    tokenizer: Tokenizer, question: str, timestamps: Sequence[float], tokens_per_group: int
) -> list[int]:
    """Token ids of a one-clip user turn plus the assistant generation prompt."""
    text = video_prompt_text(question, timestamps, tokens_per_group)
    return tokenizer.encode(text, add_special_tokens=False).ids


def video_conversation_ids(
    tokenizer: Tokenizer,
    turns: Sequence[Turn],
    timestamps: Sequence[float],
    tokens_per_group: int,
) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation about one clip, which comes with the first question;
    labels as `prompts.conversation_ids` gives them."""
    return turns_ids(
        tokenizer,
        turns,
        lambda question: video_prompt_ids(tokenizer, question, timestamps, tokens_per_group),
    )


@dataclass(frozen=True)
class SampledVideo:
    """A clip as the video processor leaves it: pixel rows, grid and its groups' times."""

    pixel_values: torch.Tensor  # [t*h*w, 1536]
    grid_thw: tuple[int, int, int]
    timestamps: tuple[float, ...]


@dataclass(frozen=True)
class MixedBatch:
    """Right-padded model inputs for conversations about an image or a clip each (images
    first in the batch, then clips)."""

    input_ids: torch.Tensor  # [batch, seq] long
    attention_mask: torch.Tensor  # [batch, seq] long
    mm_token_type_ids: torch.Tensor  # [batch, seq] int: 1 image pads, 2 video pads
    labels: torch.Tensor  # [batch, seq] long
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    pixel_values_videos: torch.Tensor | None
    video_grid_thw: torch.Tensor | None

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for Qwen3VLMoeForConditionalGeneration.forward / generate."""
        out = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
        }
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values
            out["image_grid_thw"] = self.image_grid_thw
        if self.pixel_values_videos is not None:
            out["pixel_values_videos"] = self.pixel_values_videos
            out["video_grid_thw"] = self.video_grid_thw
        return out


def make_mixed_batch(
    tokenizer: Tokenizer,
    image_processor,
    images: Sequence[tuple[Image.Image, Sequence[Turn]]],
    videos: Sequence[tuple[SampledVideo, Sequence[Turn]]],
) -> MixedBatch:
    """Conversations about images (preprocessed with the checkpoint's image processor) and
    about sampled clips, padded into one batch."""
    sp = SpecialIds.from_tokenizer(tokenizer)
    video_pad = tokenizer.token_to_id(VIDEO_PAD)
    merge = image_processor.merge_size
    rows: list[tuple[list[int], list[int]]] = []
    pixel_values = image_grid = None
    if images:
        features = image_processor(images=[im for im, _ in images], return_tensors="pt")
        pixel_values = features["pixel_values"].float()
        image_grid = features["image_grid_thw"].long()
        for (_, turns), grid in zip(images, image_grid, strict=True):
            rows.append(conversation_ids(tokenizer, turns, int(grid.prod()) // merge**2))
    for video, turns in videos:
        _, h, w = video.grid_thw
        rows.append(video_conversation_ids(tokenizer, turns, video.timestamps, h * w // merge**2))
    seq_len = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), seq_len), sp.pad, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for row, (ids, lab) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    types = (input_ids == sp.image_pad).int() + 2 * (input_ids == video_pad).int()
    return MixedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=types,
        labels=labels,
        pixel_values=pixel_values,
        image_grid_thw=image_grid,
        pixel_values_videos=torch.cat([v.pixel_values for v, _ in videos]) if videos else None,
        video_grid_thw=torch.tensor([v.grid_thw for v, _ in videos]) if videos else None,
    )
