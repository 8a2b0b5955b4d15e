"""The Triton block-FP8 kernels (linear, fused MoE) against the PyTorch references, both
variants: w8a8 (per-row activation quantization inside the GEMM) and w8a16.

Without CUDA they run in Triton's CPU interpreter at small shapes; the references quantize the
activations exactly as the kernels do, so fp32 agrees to accumulation-order noise. bf16 rounds
the intermediate (silu(gate) * up) to bf16 in both, but the kernels' fp32 sums round at other
places: bf16's tolerance.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels.triton_env import DEVICE, IN_PROCESS, rerun_in_fresh_process

pytest.importorskip("triton")

import shared.kernels.gpu as triton_kernels  # noqa: E402
from shared.kernels.gpu import fp8_triton, interpreter_compat, moe_triton  # noqa: E402
from shared.kernels.reference import (  # noqa: E402
    fp8_block_quantize,
    fp8_linear_torch,
    fused_moe_fp8_torch,
)

if DEVICE.type == "cpu":
    interpreter_compat.apply()
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _kernels_runnable(request):
    if not IN_PROCESS and request.node.name != "test_interpreter_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET was set")


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_interpreter_in_fresh_process():
    done = rerun_in_fresh_process(__file__)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("act_quant", [True, False], ids=["w8a8", "w8a16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows,out_features,in_features", [(2, 256, 128), (20, 300, 200)])
def test_fp8_linear_matches_reference(rows, out_features, in_features, dtype, act_quant):
    weight, scale = fp8_block_quantize(torch.randn(out_features, in_features, generator=_gen(1)))
    x = torch.randn(rows, in_features, generator=_gen(2)).to(dtype)
    x[0] = 0  # a row of zeros quantizes to zeros
    args = (x.to(DEVICE), weight.to(DEVICE), scale.to(DEVICE))
    out = fp8_triton.fp8_linear_triton(*args, act_quant=act_quant).cpu()
    assert out.dtype == dtype
    ref = fp8_linear_torch(x, weight, scale, act_quant=act_quant)
    assert _rel(out, ref) < TOLERANCE[dtype]
    assert not out[0].any()


def test_w8a8_differs_from_w8a16_by_the_activation_rounding():
    """The activation quantization is real (not skipped): e4m3's 3 mantissa bits show."""
    weight, scale = fp8_block_quantize(torch.randn(128, 256, generator=_gen(3)))
    x = torch.randn(4, 256, generator=_gen(4))
    w8a8 = fp8_triton.fp8_linear_triton(x, weight, scale, act_quant=True)
    w8a16 = fp8_triton.fp8_linear_triton(x, weight, scale, act_quant=False)
    assert 1e-3 < _rel(w8a8, w8a16) < 0.1


def _experts(experts: int, hidden: int, inter: int):
    gen = _gen(5)
    gate_up = torch.randn(experts, hidden, 2 * inter, generator=gen) * hidden**-0.5
    down = torch.randn(experts, inter, hidden, generator=gen) * inter**-0.5
    gate, gate_scale = fp8_block_quantize(gate_up[..., :inter])
    up, up_scale = fp8_block_quantize(gate_up[..., inter:])
    down, down_scale = fp8_block_quantize(down)
    return torch.cat([gate, up], -1), down, torch.cat([gate_scale, up_scale], -1), down_scale


@pytest.mark.parametrize("act_quant", [True, False], ids=["w8a8", "w8a16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "experts,hidden,inter,tokens", [(4, 128, 96, 5), (4, 256, 256, 3)], ids=["partial", "whole"]
)
def test_fused_moe_fp8_matches_reference(experts, hidden, inter, tokens, dtype, act_quant):
    gate_up, down, gate_up_scale, down_scale = _experts(experts, hidden, inter)
    x = torch.randn(tokens, hidden, generator=_gen(6)).to(dtype)
    weights, ids = torch.randn(tokens, experts, generator=_gen(7)).softmax(-1).topk(2, -1)
    ids[0, 1] = experts  # a row routed to no expert
    weights = weights.to(dtype)
    out = moe_triton.fused_moe_triton(
        x, gate_up, down, weights, ids, scales=(gate_up_scale, down_scale), act_quant=act_quant
    )
    ref = fused_moe_fp8_torch(
        x, gate_up, down, gate_up_scale, down_scale, weights, ids, act_quant=act_quant
    )
    assert _rel(out, ref) < TOLERANCE[dtype]


def test_the_backend_entry_points_take_the_reference_signatures():
    gate_up, down, gate_up_scale, down_scale = _experts(4, 128, 96)
    x = torch.randn(2, 128, generator=_gen(8))
    weights, ids = torch.randn(2, 4, generator=_gen(9)).softmax(-1).topk(2, -1)
    act_quant = triton_kernels.FP8_ACT_QUANT
    out = triton_kernels.fused_moe_fp8(x, gate_up, down, gate_up_scale, down_scale, weights, ids)
    ref = fused_moe_fp8_torch(x, gate_up, down, gate_up_scale, down_scale, weights, ids, act_quant)
    assert _rel(out, ref) < 1e-5
    weight, scale = fp8_block_quantize(torch.randn(256, 128, generator=_gen(10)))
    out = triton_kernels.fp8_linear(x[None], weight, scale)  # [1, 2, 128]: any leading dims
    assert out.shape == (1, 2, 256)
    assert _rel(out[0], fp8_linear_torch(x, weight, scale, act_quant)) < 1e-5


def test_misfitting_scales_are_refused():
    gate_up, down, gate_up_scale, down_scale = _experts(4, 128, 96)
    x = torch.randn(2, 128)
    weights, ids = torch.randn(2, 4).softmax(-1).topk(2, -1)
    with pytest.raises(moe_triton.MoeShapeError, match="128-blocks"):
        moe_triton.fused_moe_triton(
            x, gate_up, down, weights, ids, scales=(gate_up_scale[:, :, :1], down_scale)
        )
    weight, scale = fp8_block_quantize(torch.randn(256, 128))
    with pytest.raises(fp8_triton.Fp8ShapeError):
        fp8_triton.fp8_linear_triton(x, weight, scale[:1])
