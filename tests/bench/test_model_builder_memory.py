"""The benchmarks' random models are built in the target dtype on the target device: the peak
resident memory of building one stays within 1.15x of its weights (a model built in fp32 and then
cast peaks near 3x, which on an 80 GB GPU leaves 30B-A3B's bf16 weights no room)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_PEAK_OVER_WEIGHTS = 1.15

_PROBE = """
import json, resource, torch
from bench.common import model_config, random_text_model
config = model_config("30b-a3b", layers=3)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = random_text_model(config, torch.bfloat16, "cpu")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(p.numel() * p.element_size() for p in model.parameters())
dtypes = sorted({str(p.dtype) for p in model.parameters()})
print(json.dumps({"before": before, "peak": peak, "weights": weights, "dtypes": dtypes}))
"""


@pytest.mark.timeout(300)
def test_a_3_layer_30b_a3b_shape_peaks_within_1_15x_its_weights():
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["dtypes"] == ["torch.bfloat16"]
    assert numbers["weights"] > 4 * 2**30  # the shape is real: embeddings, 3 layers of experts
    grown = numbers["peak"] - numbers["before"]
    assert grown <= MAX_PEAK_OVER_WEIGHTS * numbers["weights"], numbers
