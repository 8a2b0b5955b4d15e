"""Dense SwiGLU MLP, used on mlp_only_layers and layers off the sparse step."""

import torch
import torch.nn.functional as F
from torch import nn

from shared.model.layers.linear import Linear, fuse_linears


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # set by fuse_gate_up after loading

    def fuse_gate_up(self) -> None:
        """One projection of the concatenated gate and up weights (one GEMM instead of two)."""
        if self.gate_up_proj is not None:
            return
        fused = fuse_linears([self.gate_proj, self.up_proj])
        if fused is None:  # FP8 gate rows ending inside a scale block: two GEMMs
            return
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj

    def forward(
        self, x: torch.Tensor, num_valid_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``num_valid_tokens`` is the MoE block's argument, accepted for one call shape: a
        dense MLP has no routing for padding rows to disturb."""
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
