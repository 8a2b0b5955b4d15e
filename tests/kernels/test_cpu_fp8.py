"""The C++ block-FP8 kernels (routed experts, linears) against the PyTorch references, and the
block format itself.

fp32: the kernels widen each e4m3 weight exactly and multiply by its block's scale, as the
reference's dequantization does; only the summation order differs (~1e-6 relative). bf16
activations: the reference computes in fp32 and rounds once, as the kernels do, so they agree
within half a bf16 ulp. The portable builds (AVX2 without AVX-512, and SSE without F16C, which
widens through a table) are checked in a subprocess, each built for its -march on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.kernels import cpu
from shared.kernels.cpu import build
from shared.kernels.reference import (
    FP8_DTYPE,
    fp8_block_dequantize,
    fp8_block_quantize,
    fp8_linear_torch,
    fused_moe_fp8_torch,
)

REPO = Path(__file__).resolve().parents[2]
BF16_RTOL = 2.0**-8


@pytest.fixture(scope="module")
def kernels():
    if not cpu.available():
        pytest.skip(f"CPU extension not built here: {cpu.build_error()}")
    return cpu


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def fp8_experts(experts: int, hidden: int, inter: int, seed: int = 0):
    """(gate_up, gate_up_scale, down, down_scale) quantized as the model quantizes them."""
    gen = _gen(seed)
    gate_up = torch.randn(experts, hidden, 2 * inter, generator=gen) * hidden**-0.5
    down = torch.randn(experts, inter, hidden, generator=gen) * inter**-0.5
    gate, gate_scale = fp8_block_quantize(gate_up[..., :inter])
    up, up_scale = fp8_block_quantize(gate_up[..., inter:])
    down, down_scale = fp8_block_quantize(down)
    return torch.cat([gate, up], -1), torch.cat([gate_scale, up_scale], -1), down, down_scale


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def test_block_quantization_round_trips_within_half_a_step():
    w = torch.randn(300, 200, generator=_gen(2)) * torch.linspace(0.1, 10, 200)
    q, scale = fp8_block_quantize(w)
    assert q.dtype == FP8_DTYPE and scale.shape == (3, 2)  # partial blocks at the edges
    back = fp8_block_dequantize(q, scale)
    for i in range(3):
        for j in range(2):
            rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
            block = w[rows, cols]
            assert scale[i, j] == block.abs().max() / 448  # the block's max maps to e4m3's
            assert (back[rows, cols] - block).abs().max() <= 2**-4 * block.abs().max()
    zero = fp8_block_quantize(torch.zeros(4, 4))
    assert zero[1].item() == 1.0 and not zero[0].float().any()


# (experts, hidden, intermediate, tokens, top_k): the medium shape; the shipped model's partial
# blocks (hidden 128, intermediate 96); odd sizes; a prefill; slices of a wide intermediate.
MOE_CASES = [
    (16, 512, 384, 1, 4),
    (16, 512, 384, 8, 4),
    (16, 128, 96, 2, 2),
    (4, 200, 300, 9, 2),
    (16, 512, 384, 300, 4),
    (4, 256, 2304, 3, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", MOE_CASES, ids=lambda c: "E{}-H{}-I{}-T{}-k{}".format(*c))
def test_fused_moe_fp8_matches_reference(kernels, case, dtype):
    experts, hidden, inter, tokens, top_k = case
    gate_up, gate_up_scale, down, down_scale = fp8_experts(experts, hidden, inter)
    gen = _gen(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    weights, ids = torch.randn(tokens, experts, generator=gen).softmax(-1).topk(top_k, -1)
    ids[0, 0] = experts  # a row routed to no expert
    args = (gate_up, down, gate_up_scale, down_scale, weights.to(dtype), ids)
    out = kernels.fused_moe_fp8(x, *args)
    ref = fused_moe_fp8_torch(x, *args)
    assert out.dtype == dtype
    assert _rel(out, ref) < (1e-5 if dtype == torch.float32 else BF16_RTOL)


def test_fused_moe_fp8_same_for_any_thread_count(kernels):
    gate_up, gate_up_scale, down, down_scale = fp8_experts(16, 512, 384)
    x = torch.randn(8, 512, generator=_gen(3))
    weights, ids = torch.randn(8, 16, generator=_gen(4)).softmax(-1).topk(4, -1)
    saved = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(
                kernels.fused_moe_fp8(x, gate_up, down, gate_up_scale, down_scale, weights, ids)
            )
    finally:
        torch.set_num_threads(saved)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "rows,out_features,in_features", [(1, 512, 512), (5, 1024, 512), (3, 300, 200), (31, 130, 129)]
)
def test_fp8_linear_matches_reference(kernels, rows, out_features, in_features, dtype):
    weight, scale = fp8_block_quantize(torch.randn(out_features, in_features, generator=_gen(5)))
    x = torch.randn(rows, in_features, generator=_gen(6)).to(dtype)
    out = kernels.fp8_linear(x, weight, scale)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    assert _rel(out, fp8_linear_torch(x, weight, scale)) < (
        1e-5 if dtype == torch.float32 else BF16_RTOL
    )


def test_fp8_linear_widens_every_e4m3_value(kernels):
    """All 254 finite codes, subnormals and negative zero included, in one weight row each."""
    bits = torch.arange(256, dtype=torch.uint8)
    finite = bits[(bits & 0x7F) != 0x7F]
    weight = finite.view(FP8_DTYPE).reshape(-1, 1).expand(-1, 8).contiguous()
    scale = torch.ones(2, 1)
    out = kernels.fp8_linear(torch.eye(8)[:1], weight, scale)
    assert torch.equal(out[0], weight[:, 0].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_many_rows_take_the_dequantized_gemm(kernels, dtype):
    """Prefill-sized inputs: the weight dequantized to x's dtype (bf16 rounds it, as a bf16
    checkpoint's weight is rounded) and one GEMM."""
    weight, scale = fp8_block_quantize(torch.randn(256, 256, generator=_gen(7)))
    x = torch.randn(cpu.FP8_GEMM_ROWS, 256, generator=_gen(8)).to(dtype)
    dense = fp8_block_dequantize(weight, scale).to(dtype).float()
    ref = torch.nn.functional.linear(x.float(), dense)
    tolerance = 1e-5 if dtype == torch.float32 else BF16_RTOL
    assert _rel(kernels.fp8_linear(x, weight, scale), ref) < tolerance


ISA_CHECK = """
import torch
from shared.kernels import cpu
from shared.kernels.reference import fp8_block_quantize, fp8_linear_torch, fused_moe_fp8_torch
from tests.kernels.test_cpu_fp8 import fp8_experts
assert cpu.available(), cpu.build_error()
gu, gs, dn, ds = fp8_experts(8, 128, 96)
x = torch.randn(3, 128)
w, ids = torch.randn(3, 8).softmax(-1).topk(2, -1)
ref = fused_moe_fp8_torch(x, gu, dn, gs, ds, w, ids)
assert (cpu.fused_moe_fp8(x, gu, dn, gs, ds, w, ids) - ref).abs().max() < 1e-5 * ref.abs().max()
bits = torch.arange(256, dtype=torch.uint8)
weight = bits[(bits & 0x7F) != 0x7F].view(torch.float8_e4m3fn).reshape(-1, 1).expand(-1, 8)
out = cpu.fp8_linear(torch.eye(8)[:1], weight.contiguous(), torch.ones(2, 1))
assert torch.equal(out[0], weight[:, 0].float())
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("march", ["haswell", "x86-64-v2"], ids=["avx2", "sse-no-f16c"])
def test_the_code_other_cpus_build_is_correct(tmp_path, march):
    """What an AVX2-only CPU compiles (F16C widening, 16 registers) and what one without F16C
    compiles (the lookup table), each built for its -march here and run."""
    if build.compiler() is None or "avx2" not in build.cpu_features():
        pytest.skip("needs a C++ compiler and an x86 CPU that runs haswell code")
    env = {
        **os.environ,
        build.MARCH_ENV: march,
        "SPLITVL_KERNEL_CACHE": str(tmp_path),
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-c", ISA_CHECK], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantize_op_equals_the_reference(kernels, dtype):
    weight, scale = fp8_block_quantize(torch.randn(300, 200, generator=_gen(9)))
    out = torch.ops.splitvl.fp8_dequantize(weight, scale, dtype)
    assert torch.equal(out, fp8_block_dequantize(weight, scale, dtype))
