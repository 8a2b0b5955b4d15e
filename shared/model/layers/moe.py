"""Sparse MoE block: softmax router, top-k, optional renormalization, routed experts.

Expert weights are stored fused in the hub layout, `gate_up_proj [E, H, 2I]` and `down_proj
[E, I, H]`, the layout every expert kernel in `shared.kernels` reads in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.kernels.select import fused_moe, router_topk


class Router(nn.Module):
    """Linear router without bias; softmax in fp32, top-k, optional renormalization, cast back."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(
        self, x: torch.Tensor, num_valid_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, ids) ``[T, k]``; rows at or past ``num_valid_tokens`` (a device tensor)
        are padding, routed to no expert (id E, weight 0)."""
        logits = F.linear(x, self.weight)  # [T, E] in the model dtype
        return router_topk(logits, self.top_k, self.norm_topk_prob, num_valid_tokens)


class Experts(nn.Module):
    """E SwiGLU experts with fused weights; gate is the first I columns of gate_up, up the
    second."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, 2 * intermediate_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """x [T, H]; weights, experts [T, k] -> [T, H]."""
        return fused_moe(x, self.gate_up_proj, self.down_proj, weights, experts)


class SparseMoeBlock(nn.Module):
    """Router + experts; no shared expert."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        norm_topk_prob: bool,
    ):
        super().__init__()
        self.gate = Router(hidden_size, num_experts, top_k, norm_topk_prob)
        self.experts = Experts(num_experts, hidden_size, intermediate_size)

    def forward(
        self, x: torch.Tensor, num_valid_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows at or past ``num_valid_tokens`` (padding) read no expert and come out zero."""
        weights, experts = self.gate(x, num_valid_tokens)
        return self.experts(x, weights, experts)
