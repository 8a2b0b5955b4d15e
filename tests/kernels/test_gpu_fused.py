"""The fused Triton ops around the GEMMs against their PyTorch references (Triton's interpreter
without a GPU): residual add + RMSNorm, q/k RMSNorm + rotary, router top-k, the K/V store.

Elementwise results are bit-exact in bf16 (the kernels round where transformers' eager ops
round); a reduction's summation order may differ from torch's, which moves an fp32 value by an
ulp and, rarely, a bf16 value by one ulp: such cases are counted and bounded, never tolerated
silently. fp32 agrees within 1e-5.
"""

from __future__ import annotations

import pytest  # noqa: E402
import torch

from tests.kernels.triton_env import DEVICE, IN_PROCESS, rerun_in_fresh_process

pytest.importorskip("triton")

import shared.kernels.gpu as triton_kernels  # noqa: E402
from shared.kernels.gpu import interpreter_compat  # noqa: E402
from shared.kernels.reference import (  # noqa: E402
    add_rms_norm_torch,
    kv_store_torch,
    qk_norm_rope_torch,
    router_topk_torch,
)

if DEVICE.type == "cpu":
    interpreter_compat.apply()


@pytest.fixture(autouse=True)
def _kernels_runnable(request):
    if not IN_PROCESS and request.node.name != "test_interpreter_in_fresh_process":
        pytest.skip(
            "triton was imported before TRITON_INTERPRET was set; "
            "test_interpreter_in_fresh_process runs this file instead"
        )


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_interpreter_in_fresh_process():
    done = rerun_in_fresh_process(__file__)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]


def _randn(*shape, seed: int, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def _close_in_bf16(got: torch.Tensor, want: torch.Tensor, max_off_by_one: float = 0.01) -> None:
    """Equal, except a few values one bf16 ulp apart (a reduction summed in another order)."""
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
    diff = (got.float() - want.float()).abs()
    ulp = want.float().abs().clamp_min(2**-126) * 2**-7  # one bf16 ulp at each value, at most
    assert bool((diff <= ulp).all()), f"max diff {diff.max().item()} beyond one ulp"
    assert (diff > 0).float().mean().item() <= max_off_by_one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm(dtype, with_residual):
    x = _randn(7, 96, seed=1, dtype=dtype)
    residual = _randn(7, 96, seed=2, scale=3.0, dtype=dtype) if with_residual else None
    weight = (1.0 + _randn(96, seed=3, scale=0.3)).to(dtype)
    got, got_res = triton_kernels.add_rms_norm(x, residual, weight, 1e-6)
    want, want_res = add_rms_norm_torch(x, residual, weight, 1e-6)
    assert torch.equal(got_res, want_res)  # the residual sum rounds exactly as torch's add
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        _close_in_bf16(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope(dtype):
    tokens, q_heads, kv_heads, dim = 5, 4, 2, 32
    q = _randn(tokens, q_heads, dim, seed=4, dtype=dtype)
    k = _randn(tokens, kv_heads, dim, seed=5, scale=2.0, dtype=dtype)
    qw = (1.0 + _randn(dim, seed=6, scale=0.3)).to(dtype)
    kw = (1.0 + _randn(dim, seed=7, scale=0.3)).to(dtype)
    angles = _randn(tokens, dim // 2, seed=8, scale=3.0)
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    got_q, got_k = triton_kernels.qk_norm_rope(q, k, qw, kw, 1e-6, cos, sin)
    want_q, want_k = qk_norm_rope_torch(q, k, qw, kw, 1e-6, cos, sin)
    for got, want in ((got_q, want_q), (got_k, want_k)):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            _close_in_bf16(got, want, max_off_by_one=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("renormalize", [True, False])
def test_router_topk(dtype, renormalize):
    logits = _randn(9, 24, seed=9, scale=2.0, dtype=dtype)
    got_w, got_ids = triton_kernels.router_topk(logits, 4, renormalize)
    want_w, want_ids = router_topk_torch(logits, 4, renormalize)
    assert got_ids.dtype == torch.int64 and torch.equal(got_ids, want_ids)
    if dtype == torch.float32:
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    else:
        _close_in_bf16(got_w, want_w, max_off_by_one=0.1)


def test_router_ties_go_to_the_lower_expert_id():
    logits = torch.zeros(2, 8, device=DEVICE)
    logits[:, 5] = 1.0
    _, ids = triton_kernels.router_topk(logits, 3, True)
    assert ids.tolist() == [[5, 0, 1], [5, 0, 1]]


@pytest.mark.parametrize("count", [0, 4, 9])
def test_router_routes_rows_past_the_count_to_no_expert(count):
    """Padding rows (at or past a count read on the device) get id E and weight 0; the real
    rows are routed as without a count."""
    logits = _randn(9, 24, seed=12, scale=2.0, dtype=torch.bfloat16)
    num_valid = torch.tensor([count], device=DEVICE)
    got_w, got_ids = triton_kernels.router_topk(logits, 4, True, num_valid)
    want_w, want_ids = router_topk_torch(logits, 4, True, num_valid)
    assert torch.equal(got_ids, want_ids)
    _close_in_bf16(got_w, want_w, max_off_by_one=0.1)
    plain_w, plain_ids = router_topk_torch(logits, 4, True)
    assert torch.equal(want_ids[:count], plain_ids[:count])
    assert torch.equal(want_w[:count], plain_w[:count])
    assert (want_ids[count:] == 24).all() and (want_w[count:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_store(dtype):
    blocks, block_size, kv_heads, dim = 6, 4, 2, 16
    k = _randn(5, kv_heads, dim, seed=10, dtype=dtype)
    v = _randn(5, kv_heads, dim, seed=11, dtype=dtype)
    slots = torch.tensor([3, 9, 10, 22, 0], device=DEVICE)
    caches = [torch.zeros(blocks, block_size, kv_heads, dim, dtype=dtype, device=DEVICE)]
    caches = caches * 0 + [torch.zeros_like(caches[0]) for _ in range(4)]
    triton_kernels.kv_store(k, v, caches[0], caches[1], slots)
    kv_store_torch(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
