"""bf16 GEMMs at bucketed row counts (shared.kernels.cpu.onednn) against torch's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shared.kernels.cpu import onednn
from shared.kernels.reference import fused_moe_grouped, fused_moe_torch


def test_buckets_are_few_and_tight():
    sizes = [onednn.bucket_rows(m) for m in range(1, 8193)]
    assert all(b >= m for m, b in zip(range(1, 8193), sizes, strict=True))
    assert all(b * 8 <= m * 9 for m, b in zip(range(17, 8193), sizes[16:], strict=True))
    assert sizes[:16] == list(range(1, 17))
    # 16 exact sizes, then at most 8 per doubling up to 2^13.
    assert len(set(sizes)) <= 16 + 8 * 9
    assert all(onednn.bucket_rows(b) == b for b in set(sizes))  # a bucket is its own bucket


@pytest.mark.parametrize("rows", [1, 16, 17, 33, 100, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_torch(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen).to(torch.bfloat16)
    w = torch.randn(80, 96, generator=gen).to(torch.bfloat16)
    b = torch.randn(80, generator=gen).to(torch.bfloat16) if bias else None
    out = onednn.linear(x, w, b)
    assert out.shape == (rows, 80) and out.dtype == torch.bfloat16 and out.is_contiguous()
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    torch.testing.assert_close(out.float(), ref, rtol=1.6e-2, atol=2e-2)
    # Leading dimensions are kept; fp32 is torch's own call.
    x3 = x.view(1, rows, 96)
    torch.testing.assert_close(onednn.linear(x3, w, b), out.view(1, rows, 80), rtol=0, atol=0)
    x32, w32 = x.float(), w.float()
    assert torch.equal(onednn.linear(x32, w32), F.linear(x32, w32))


def _routing(num_tokens: int, top_k: int, num_experts: int, seed: int, skew: bool):
    gen = torch.Generator().manual_seed(seed)
    if skew:  # most rows on two experts, some experts empty, some rows routed nowhere
        probs = torch.tensor([8.0, 4.0] + [0.0, 0.5] * ((num_experts - 2) // 2))
        ids = torch.multinomial(probs.expand(num_tokens, -1), top_k, generator=gen)
        ids[::7, -1] = num_experts
    else:
        ids = torch.rand(num_tokens, num_experts, generator=gen).argsort(-1)[:, :top_k]
    weights = torch.rand(num_tokens, top_k, generator=gen)
    return weights, ids


@pytest.mark.parametrize("skew", [False, True], ids=["even", "skewed"])
@pytest.mark.parametrize("num_tokens", [5, 300])
def test_grouped_mm_matches_torch(num_tokens, skew):
    num_experts, hidden, inter, top_k = 8, 64, 48, 3
    gen = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens * top_k, hidden, generator=gen).to(torch.bfloat16)
    w = (torch.randn(num_experts, hidden, 2 * inter, generator=gen) / 8).to(torch.bfloat16)
    _, ids = _routing(num_tokens, top_k, num_experts, num_tokens, skew)
    counts = torch.bincount(ids.flatten(), minlength=num_experts + 1)[:num_experts]
    offs = counts.cumsum(0).to(torch.int32)
    routed = int(offs[-1])
    out = onednn.grouped_mm(x, w, offs)
    assert out.shape == (num_tokens * top_k, 2 * inter)
    expert = torch.repeat_interleave(torch.arange(num_experts), counts)
    ref = torch.einsum("nk,nkc->nc", x[:routed].float(), w[expert].float())
    torch.testing.assert_close(out[:routed].float(), ref, rtol=1.6e-2, atol=2e-2)
    fp32 = onednn.grouped_mm(x.float(), w.float(), offs)
    torch.testing.assert_close(fp32[:routed], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("skew", [False, True], ids=["even", "skewed"])
def test_fused_moe_with_bucketed_gemms_matches_the_reference(skew):
    num_tokens, num_experts, hidden, inter, top_k = 200, 8, 64, 48, 3
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    gate_up = (torch.randn(num_experts, hidden, 2 * inter, generator=gen) / 8).to(torch.bfloat16)
    down = (torch.randn(num_experts, inter, hidden, generator=gen) / 8).to(torch.bfloat16)
    weights, ids = _routing(num_tokens, top_k, num_experts, 4, skew)
    weights = weights.to(torch.bfloat16)
    out = fused_moe_grouped(x, gate_up, down, weights, ids, onednn.grouped_mm)
    ref = fused_moe_torch(x.float(), gate_up.float(), down.float(), weights.float(), ids)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    assert torch.isfinite(out).all()
