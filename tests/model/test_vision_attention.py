"""Vision attention runs per image on SDPA's fused kernels: the same result as the whole-matrix
(math) path, and memory that does not grow with the square of an image's patches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shared.model.layers.rotary import rotate_half
from shared.model.vision import VisionAttention

REPO = Path(__file__).resolve().parents[2]


def _math_path(attn: VisionAttention, x, cos, sin, seq_lens):
    """The explicit formula: softmax(q k^T / sqrt(d)) v per image, whole score matrices."""
    n = x.shape[0]
    q, k, v = attn.qkv(x).view(n, 3, attn.num_heads, attn.head_dim).unbind(1)
    q = (q * cos + rotate_half(q) * sin).transpose(0, 1)
    k = (k * cos + rotate_half(k) * sin).transpose(0, 1)
    v = v.transpose(0, 1)
    outs = []
    start = 0
    for length in seq_lens:
        rows = slice(start, start + length)
        scores = q[:, rows] @ k[:, rows].transpose(1, 2) / attn.head_dim**0.5
        outs.append((F.softmax(scores, dim=-1) @ v[:, rows]).transpose(0, 1))
        start += length
    return attn.proj(torch.cat(outs).reshape(n, -1))


@torch.no_grad()
def test_per_image_attention_equals_the_math_path_with_no_scores_across_images():
    torch.manual_seed(0)
    attn = VisionAttention(hidden=96, num_heads=4)
    seq_lens = [64, 16, 36]  # three images (or frames) of different sizes
    n = sum(seq_lens)
    x = torch.randn(n, 96)
    angles = torch.randn(n, 12)
    cos, sin = (
        torch.cat([angles, angles], -1).cos()[:, None],
        torch.cat([angles, angles], -1).sin()[:, None],
    )
    got = attn(x, cos, sin, seq_lens)
    torch.testing.assert_close(got, _math_path(attn, x, cos, sin, seq_lens), rtol=1e-5, atol=1e-5)
    # Block-diagonal: changing the second image does not move the first or the third
    y = x.clone()
    y[64:80] += 1.0
    again = attn(y, cos, sin, seq_lens)
    torch.testing.assert_close(again[:64], got[:64], rtol=0, atol=1e-6)
    torch.testing.assert_close(again[80:], got[80:], rtol=0, atol=1e-6)


_PROBE = """
import json, resource, torch
from shared.model.vision import VisionAttention
torch.manual_seed(0)
attn = VisionAttention(hidden=1152, num_heads=16).eval()
n = 4096  # a 1024x1024 image's patches at patch 16
x = torch.randn(n, 1152)
cos = torch.ones(n, 1, 72)
sin = torch.zeros(n, 1, 72)
with torch.inference_mode():
    attn(x[:64], cos[:64], sin[:64], [64])  # warm-up: lazy initialisation is not the attention
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    attn(x, cos, sin, [n])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"grown": peak - before}))
"""


@pytest.mark.timeout(120)
def test_a_4096_patch_image_never_holds_its_score_matrix():
    result = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    grown = json.loads(result.stdout.strip().splitlines()[-1])["grown"]
    scores = 16 * 4096 * 4096 * 4  # one fp32 [heads, n, n] score matrix: 1 GiB
    assert grown < scores / 4, f"attention grew the resident set by {grown / 2**20:.0f} MiB"
