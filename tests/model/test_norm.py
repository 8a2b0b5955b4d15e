"""RMSNorm's one-op fp32 path against the explicit formula it replaces (the reference)."""

from __future__ import annotations

import pytest
import torch

from shared.model.layers.norm import RMSNorm


def _reference(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * h.to(x.dtype)


@pytest.mark.parametrize("shape", [(1, 64), (33, 512), (32, 8, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_matches_the_explicit_formula(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    norm = RMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=gen))
        x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
        (out, _), ref = norm(x), _reference(norm, x)
    assert out.dtype == ref.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:  # the explicit formula itself: bf16 rounds after normalizing, before scaling
        assert torch.equal(out, ref)
