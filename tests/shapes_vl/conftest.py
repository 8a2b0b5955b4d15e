"""Fixtures for the shipped small model checkpoint (models/shapes-vl)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "shapes-vl"


@pytest.fixture(scope="session")
def shipped_config() -> dict:
    """The shipped checkpoint's config.json."""
    return json.loads((SHIPPED / "config.json").read_text())


@pytest.fixture(scope="session")
def shipped_hf_model():
    """transformers' model loaded from the shipped directory (hub expert layout on disk)."""
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(SHIPPED, dtype=torch.float32)
    return model.eval()
