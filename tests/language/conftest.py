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
