"""Shared fixtures: tiny random checkpoints written by transformers into temporary directories."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Services the tests start (in this process and in subprocesses) would otherwise register in the
# host's CPU placement registry and split the cores between themselves and whatever else runs
# on the machine; tests/common/test_placement.py turns it on where it is the subject.
os.environ["SPLITVL_PLACEMENT"] = "off"

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


@pytest.fixture
def other_process():
    """A live process that is not this one (a CPU placement claim of its pid counts), killed
    afterwards."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()
