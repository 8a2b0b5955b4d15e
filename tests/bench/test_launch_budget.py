"""One decoder layer of a decode step launches at most 16 kernels with the CUDA kernel selection
(counted on a CPU: the Triton kernels run in Triton's interpreter, the other PyTorch ops are
counted from the dispatcher). Each small op around the GEMMs is one fused kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUDGET = 16


@pytest.mark.timeout(300)
def test_a_decode_step_layer_stays_within_the_launch_budget(tmp_path):
    out = tmp_path / "launches.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    argv = ["--shape", "tiny", "--layers", "2", "--device", "cpu", "--count-launches"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.decode", *argv, "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "cuda selection: launches per decoder layer:" in done.stdout
    result = json.loads(out.read_text())
    cuda = result["cuda"]
    assert cuda["per_layer"] <= BUDGET, cuda["kernels"]
    kernels = cuda["kernels"]
    for fused in ("add_rms_norm", "qk_norm_rope", "router_topk", "kv_store"):
        assert kernels.get(f"triton:_{fused}_kernel", 0) >= 1, kernels
    assert kernels["triton:_add_rms_norm_kernel"] == 2  # both norms, each with its residual add
    elementwise = ("mul.Tensor", "add.Tensor", "rsqrt.default", "pow.Tensor_Scalar", "cat.default")
    assert not any(name in kernels for name in elementwise), kernels
    # The CPU selection is counted too (it keeps the PyTorch composition of the small ops)
    assert result["cpu"]["per_layer"] > 0
