"""Every Triton launch the server makes at the 30B-A3B shapes compiles for an H200 (sm_90) in bf16
and in fp32, without spilling registers or overrunning shared memory; checked on the CPU with
Triton's own compiler (no GPU needed). The start-up warm-up's launches are among them, so the
small fused ops are checked too, and so are the block-FP8 linears and experts (w8a8 and w8a16)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_bf16_and_fp32_launches_compile_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--tokens", "1", "64", "256", "1024", "4096", "--batches", "1", "64"]
    args += ["--contexts", "2048", "32768"]
    result = subprocess.run(
        [sys.executable, "-m", "bench.kernels_triton", "--compile-only", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("_")]
    kinds = {line.split()[0] for line in lines}
    assert {"_gate_up_kernel", "_down_kernel", "_decode_kernel", "_prefill_kernel"} <= kinds
    assert "_fp8_linear_kernel" in kinds
    fused = {"_add_rms_norm_kernel", "_qk_norm_rope_kernel", "_router_topk_kernel"}
    assert fused | {"_kv_store_kernel", "_align_kernel", "_decode_merge_kernel"} <= kinds
    # Sizes are not specialized on: one decode kernel per dtype for every batch and context.
    assert sum(line.startswith("_decode_kernel") for line in lines) == 2
    assert "over budget" not in result.stdout
