"""RMSNorm as Qwen3 computes it, with the residual add that precedes every norm folded in."""

import torch
from torch import nn

from shared.kernels.select import add_rms_norm


class RMSNorm(nn.Module):
    """Normalize in fp32, cast back to the input dtype, then scale (the order matters in bf16).

    Called with the residual stream, it first adds `x` to it (as transformers adds each block's
    output back before the next norm) and returns the new stream too: one kernel on a GPU where
    the add, the norm and the scale were eight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual); without a residual (RMSNorm(x), x)."""
        return add_rms_norm(x, residual, self.weight, self.eps)
