"""Fixtures for the language-service tests: the tiny checkpoint with a tokenizer, image inputs."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.e2e.tokenizer_util import save_tokenizer
from tests.tiny import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_ID, VISION_START_ID, VOCAB

TINY_SPECIAL_IDS = {
    "<|image_pad|>": IMAGE_TOKEN_ID,
    "<|video_pad|>": VIDEO_TOKEN_ID,
    "<|vision_start|>": VISION_START_ID,
    "<|vision_end|>": VISION_END_ID,
}


@pytest.fixture(scope="session")
def tiny_vl_model_dir(tiny_vl_dir, tmp_path_factory):
    """The tiny Qwen3-VL-MoE checkpoint plus a byte-level tokenizer pinned to its special ids."""
    path = tmp_path_factory.mktemp("tiny_vl_tok")
    for item in tiny_vl_dir.iterdir():
        if item.is_file():
            shutil.copy(item, path / item.name)
    save_tokenizer(path, "{{ messages }}", special_ids=TINY_SPECIAL_IDS, vocab_size=VOCAB)
    return path


@pytest.fixture(scope="session")
def tiny_vl_hf(tiny_vl):
    """The transformers model that wrote the tiny checkpoint (fp32, eval)."""
    return tiny_vl[1]


@pytest.fixture(scope="session")
def tiny_vision(tiny_vl_dir):
    """The vision tower of the tiny checkpoint, loaded by shared.model."""
    from shared.model.vision import Qwen3VLVisionModel

    return Qwen3VLVisionModel.from_pretrained(tiny_vl_dir, dtype=torch.float32).eval()


def make_sequence(
    token_ids: list[int],
    images: tuple = (),
    image_token_id: int = IMAGE_TOKEN_ID,
    request_id: str = "r",
    **sampling,
):
    """An engine Sequence for unit tests; ``images`` are ImageInputs placed on the pad ids."""
    from services.language.request import GenerationRequest, SamplingParams, Sequence

    request = GenerationRequest(
        request_id, tuple(token_ids), tuple(images), SamplingParams(**sampling), 0.0
    )
    positions = [i for i, t in enumerate(token_ids) if t == image_token_id] if images else []
    return Sequence(
        request=request,
        token_ids=list(token_ids),
        image_positions=positions,
        image_embeds=torch.cat([im.embeds for im in images]) if images else None,
        image_deepstack=torch.cat([im.deepstack for im in images]) if images else None,
        mrope_positions=None,
    )


def fake_image(num_tokens: int, content_hash: str, hidden: int = 4):
    """An ImageInput with random rows (for cache/scheduler tests that never run a model)."""
    from services.language.request import ImageInput

    return ImageInput(
        torch.randn(num_tokens, hidden), torch.zeros(num_tokens, 0), (1, 2, 2 * num_tokens),
        content_hash,
    )
