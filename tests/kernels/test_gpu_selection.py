"""The shipped model answers the same through the CUDA kernel selection (every fused Triton
kernel, run in Triton's interpreter on a CPU) as through the CPU selection: the same greedy tokens
on held-out questions, end to end through the engine and the front end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _answers(**env: str) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.answers_probe", "4"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(600)
def test_the_cuda_selection_gives_the_shipped_models_greedy_answers():
    reference = _answers(SPLITVL_KERNELS="auto")
    triton = _answers(SPLITVL_KERNELS="gpu", TRITON_INTERPRET="1")
    assert [a["ids"] for a in triton] == [a["ids"] for a in reference]
    assert all(a["text"] for a in reference)
