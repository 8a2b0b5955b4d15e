"""Token sequences and padded batches for the small model, in the Qwen3-VL chat format.

A prompt is the chat template's rendering of one user turn (image, then question) with the single
`<|image_pad|>` expanded to the image's token count, followed by the generation prompt:
`<|im_start|>user\\n<|vision_start|><|image_pad|>*n<|vision_end|>Q<|im_end|>\\n<|im_start|>assistant\\n`.
The answer is followed by `<|im_end|>`, which the model learns to emit to stop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from tokenizers import Tokenizer

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SpecialIds:
    """The special token ids a prompt needs."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> SpecialIds:
        """Look the ids up by token name."""
        ids = [
            tokenizer.token_to_id(name)
            for name in (
                "<|im_start|>",
                "<|im_end|>",
                "<|vision_start|>",
                "<|vision_end|>",
                "<|image_pad|>",
                "<|endoftext|>",
            )
        ]
        if any(i is None for i in ids):
            raise ValueError("tokenizer lacks a Qwen special token; rebuild it with tokenizer.py")
        return cls(*ids)


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def prompt_ids(tokenizer: Tokenizer, question: str, num_image_tokens: int) -> list[int]:
    """Token ids of a one-image user turn plus the assistant generation prompt."""
    sp = SpecialIds.from_tokenizer(tokenizer)
    return (
        [sp.im_start]
        + _encode(tokenizer, "user\n")
        + [sp.vision_start]
        + [sp.image_pad] * num_image_tokens
        + [sp.vision_end]
        + _encode(tokenizer, question)
        + [sp.im_end]
        + _encode(tokenizer, "\n")
        + [sp.im_start]
        + _encode(tokenizer, "assistant\n")
    )


def answer_ids(tokenizer: Tokenizer, answer: str) -> list[int]:
    """Token ids the model must generate for `answer`, ending with <|im_end|>."""
    return _encode(tokenizer, answer) + [SpecialIds.from_tokenizer(tokenizer).im_end]


def followup_ids(tokenizer: Tokenizer, question: str) -> list[int]:
    """A later text-only user turn after an answer, plus the assistant generation prompt."""
    sp = SpecialIds.from_tokenizer(tokenizer)
    return (
        _encode(tokenizer, "\n")
        + [sp.im_start]
        + _encode(tokenizer, "user\n")
        + _encode(tokenizer, question)
        + [sp.im_end]
        + _encode(tokenizer, "\n")
        + [sp.im_start]
        + _encode(tokenizer, "assistant\n")
    )


# (question, answer); a None answer marks the turn to generate.
Turn = tuple[str, str | None]


def conversation_ids(
    tokenizer: Tokenizer, turns: Sequence[Turn], num_image_tokens: int
) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation about one image: the image comes with the first question.

    Labels are IGNORE_INDEX except on answers (each with its <|im_end|>). A None answer ends the
    sequence at that turn's generation prompt.
    """
    return turns_ids(
        tokenizer, turns, lambda question: prompt_ids(tokenizer, question, num_image_tokens)
    )


def turns_ids(
    tokenizer: Tokenizer, turns: Sequence[Turn], first_prompt: Callable[[str], list[int]]
) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation whose first turn's prompt is `first_prompt(question)`
    (the one carrying the image or clip); labels as `conversation_ids` gives them."""
    ids: list[int] = []
    labels: list[int] = []
    for i, (question, answer) in enumerate(turns):
        prompt = first_prompt(question) if i == 0 else followup_ids(tokenizer, question)
        ids += prompt
        labels += [IGNORE_INDEX] * len(prompt)
        if answer is None:
            break
        target = answer_ids(tokenizer, answer)
        ids += target
        labels += target
    return ids, labels


@dataclass(frozen=True)
class Batch:
    """Right-padded model inputs for a batch of (image, question[, answer]) items."""

    input_ids: torch.Tensor  # [batch, seq] long
    attention_mask: torch.Tensor  # [batch, seq] long
    mm_token_type_ids: torch.Tensor  # [batch, seq] int, 1 on image pads
    labels: torch.Tensor  # [batch, seq] long, IGNORE_INDEX off the answer tokens
    pixel_values: torch.Tensor  # [sum of patches, 1536] fp32
    image_grid_thw: torch.Tensor  # [batch, 3] long

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for Qwen3VLMoeForConditionalGeneration.forward / generate."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }


def make_batch(
    tokenizer: Tokenizer,
    image_processor,
    images: Sequence[Image.Image],
    questions: Sequence[str],
    answers: Sequence[str] | None = None,
) -> Batch:
    """A batch of one-question prompts (with their answers when given)."""
    turns = [[(q, None if answers is None else answers[i])] for i, q in enumerate(questions)]
    return make_conversation_batch(tokenizer, image_processor, images, turns)


def make_conversation_batch(
    tokenizer: Tokenizer,
    image_processor,
    images: Sequence[Image.Image],
    conversations: Sequence[Sequence[Turn]],
) -> Batch:
    """Preprocess images with the checkpoint's image processor and build padded sequences."""
    if len(images) != len(conversations):
        raise ValueError(f"{len(images)} images for {len(conversations)} conversations")
    features = image_processor(images=list(images), return_tensors="pt")
    grid_thw = features["image_grid_thw"].long()
    merge = image_processor.merge_size
    sp = SpecialIds.from_tokenizer(tokenizer)
    rows = [
        conversation_ids(tokenizer, turns, int(grid_thw[i].prod()) // (merge * merge))
        for i, turns in enumerate(conversations)
    ]
    seq_len = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), seq_len), sp.pad, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for row, (ids, lab) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=(input_ids == sp.image_pad).int(),
        labels=labels,
        pixel_values=features["pixel_values"].float(),
        image_grid_thw=grid_thw,
    )
