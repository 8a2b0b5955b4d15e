"""Sparse MoE block: softmax router, top-k, optional renormalization, routed experts.

Expert weights are stored fused in the hub layout, `gate_up_proj [E, H, 2I]` and `down_proj
[E, I, H]`, the layout every expert kernel in `shared.kernels` reads in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shared.kernels.reference import FP8_DTYPE, fp8_block_quantize, fp8_blocks
from shared.kernels.select import fused_moe, fused_moe_fp8, router_topk


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


def _fixed(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class Experts(nn.Module):
    """E SwiGLU experts with fused weights; gate is the first I columns of gate_up, up the
    second.

    Block FP8 (`use_fp8` before loading, or `quantize_fp8` after): the same two tensors in
    float8_e4m3fn, with ``gate_up_proj_scale_inv [E, ceil(H/128), 2 ceil(I/128)]`` (gate's
    column blocks, then up's: each half is blocked on its own, as the per-expert checkpoint
    tensors are) and ``down_proj_scale_inv [E, ceil(I/128), ceil(H/128)]``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, 2 * intermediate_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.register_parameter("gate_up_proj_scale_inv", None)
        self.register_parameter("down_proj_scale_inv", None)

    @property
    def is_fp8(self) -> bool:
        return self.gate_up_proj_scale_inv is not None

    def use_fp8(self) -> None:
        """Empty FP8 weights and scales of this module's shapes, to be loaded (meta device)."""
        experts, hidden, two_inter = self.gate_up_proj.shape
        inter, device = two_inter // 2, self.gate_up_proj.device
        nh, ni = fp8_blocks(hidden), fp8_blocks(inter)
        self.gate_up_proj = _fixed(
            torch.empty(experts, hidden, two_inter, dtype=FP8_DTYPE, device=device)
        )
        self.down_proj = _fixed(torch.empty(experts, inter, hidden, dtype=FP8_DTYPE, device=device))
        self.gate_up_proj_scale_inv = _fixed(torch.empty(experts, nh, 2 * ni, device=device))
        self.down_proj_scale_inv = _fixed(torch.empty(experts, ni, nh, device=device))

    def quantize_fp8(self) -> None:
        """Quantize the loaded weights in place (gate and up halves blocked separately)."""
        inter = self.down_proj.shape[1]
        gate, gate_scale = fp8_block_quantize(self.gate_up_proj[..., :inter])
        up, up_scale = fp8_block_quantize(self.gate_up_proj[..., inter:])
        down, down_scale = fp8_block_quantize(self.down_proj)
        self.gate_up_proj = _fixed(torch.cat([gate, up], dim=-1))
        self.gate_up_proj_scale_inv = _fixed(torch.cat([gate_scale, up_scale], dim=-1))
        self.down_proj, self.down_proj_scale_inv = _fixed(down), _fixed(down_scale)

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """x [T, H]; weights, experts [T, k] -> [T, H]."""
        if self.is_fp8:
            return fused_moe_fp8(
                x,
                self.gate_up_proj,
                self.down_proj,
                self.gate_up_proj_scale_inv,
                self.down_proj_scale_inv,
                weights,
                experts,
            )
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
