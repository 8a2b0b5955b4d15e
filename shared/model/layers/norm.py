"""RMSNorm as Qwen3 computes it."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Normalize in fp32, cast back to the input dtype, then scale (the order matters in bf16)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype:
            # The same arithmetic as below in one op instead of six (decode steps are short).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
