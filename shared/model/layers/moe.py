"""Sparse MoE block: softmax router, top-k, optional renormalization, grouped expert compute.

Expert weights are stored fused in the hub layout, `gate_up_proj [E, H, 2I]` and `down_proj [E, I,
H]`,
which is the right-hand operand layout of `torch._grouped_mm`: tokens sorted by expert multiply
their
expert's matrix in one call. Where grouped_mm is unavailable (or strides are not 16-byte aligned)
the same
sorted layout is computed with one matmul per expert that received tokens (never a loop over
tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


class Router(nn.Module):
    """Linear router without bias; softmax in fp32, top-k, optional renormalization, cast back."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x, self.weight)  # [T, E] in the model dtype
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts


def _aligned(*tensors: torch.Tensor) -> bool:
    return all(t.shape[-1] * t.element_size() % 16 == 0 for t in tensors)


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

    def _grouped(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [n, K] sorted by expert, w [E, K, N], counts [E] -> [n, N]."""
        if _HAS_GROUPED_MM and _aligned(x, w) and x.dtype in (torch.float32, torch.bfloat16):
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            return torch._grouped_mm(x, w, offs=offs)
        out = x.new_empty(x.shape[0], w.shape[-1])
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                out[start : start + n] = x[start : start + n] @ w[e]
                start += n
        return out

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """x [T, H]; weights, experts [T, k] -> [T, H]."""
        num_tokens, top_k = experts.shape
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_idx = order // top_k
        counts = torch.bincount(flat, minlength=self.num_experts)
        h = self._grouped(x[token_idx], self.gate_up_proj, counts)  # [T*k, 2I]
        gate, up = h.chunk(2, dim=-1)
        h = self._grouped(F.silu(gate) * up, self.down_proj, counts)  # [T*k, H]
        h = h * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token_idx, h)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.gate(x)
        return self.experts(x, weights, experts)
