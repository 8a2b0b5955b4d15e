"""Shared fixtures: tiny random checkpoints written by transformers into temporary directories."""

from __future__ import annotations

import pytest

from tests.tiny import make_vl_checkpoint


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory):
    """(checkpoint dir, the HF model that wrote it) for a tiny random Qwen3-VL-MoE."""
    path = tmp_path_factory.mktemp("tiny_vl")
    model = make_vl_checkpoint(path, seed=0)
    return path, model


@pytest.fixture(scope="session")
def tiny_vl_dir(tiny_vl):
    """A tiny random Qwen3-VL-MoE checkpoint directory (config, safetensors, preprocessor
    config)."""
    return tiny_vl[0]
