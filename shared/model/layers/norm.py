"""RMSNorm as Qwen3 computes it."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Normalize in fp32, cast back to the input dtype, then scale (the order matters in bf16)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
