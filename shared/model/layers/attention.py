"""Text self-attention with per-head q/k RMSNorm, RoPE and GQA.

The attention kernel itself is pluggable: `AttentionBackend` receives q/k/v after q/k-norm and RoPE.
Without
one, the tokens form a single sequence with full causal attention (tests, tools). The engine passes
a
backend that writes k/v into its paged cache and attends over each sequence's cached context.
Head counts come from the projection shapes, so sharding the projections across tensor-parallel
ranks
(columns of q/k/v, rows of o) needs no change here.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from shared.kernels.select import qk_norm_rope
from shared.model.layers.linear import Linear, fuse_linears
from shared.model.layers.norm import RMSNorm


class AttentionBackend(Protocol):
    """Computes attention for one layer over flattened tokens."""

    def __call__(
        self,
        layer_idx: int,
        q: torch.Tensor,  # [T, q_heads, D]
        k: torch.Tensor,  # [T, kv_heads, D]
        v: torch.Tensor,  # [T, kv_heads, D]
        scale: float,
    ) -> torch.Tensor:  # [T, q_heads, D]
        ...


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Full causal attention of one sequence; q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale
    )
    return out.transpose(0, 1)


class Attention(nn.Module):
    """Qwen3 attention block: q/k/v/o projections without bias, q/k norm over head_dim before
    RoPE."""

    def __init__(
        self,
        layer_idx: int,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rms_norm_eps: float,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.q_proj = Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, rms_norm_eps)
        self.qkv_proj: nn.Module | None = None  # set by fuse_qkv after loading
        self._qkv_sizes: tuple[int, int, int] = ()

    @property
    def num_heads(self) -> int:
        """q heads of this module's weights (fewer on a tensor-parallel rank)."""
        rows = self._qkv_sizes[0] if self.qkv_proj is not None else self.q_proj.weight.shape[0]
        return rows // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        """kv heads of this module's weights (fewer on a tensor-parallel rank)."""
        rows = self._qkv_sizes[1] if self.qkv_proj is not None else self.k_proj.weight.shape[0]
        return rows // self.head_dim

    def fuse_qkv(self) -> None:
        """Replace q/k/v by one projection of their concatenated weights (one GEMM instead of
        three). Done after loading, so checkpoints keep their q/k/v names."""
        if self.qkv_proj is not None:
            return
        parts = [self.q_proj, self.k_proj, self.v_proj]
        fused = fuse_linears(parts)
        if fused is None:  # FP8 heads that end inside a scale block: three GEMMs
            return
        self._qkv_sizes = tuple(p.weight.shape[0] for p in parts)
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.qkv_proj(x).split(self._qkv_sizes, dim=-1)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        backend: AttentionBackend | None,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self._project(x)
        q, k = qk_norm_rope(  # per-head RMSNorm, then rotary: one kernel on a GPU
            q.reshape(num_tokens, -1, self.head_dim),
            k.reshape(num_tokens, -1, self.head_dim),
            self.q_norm.weight,
            self.k_norm.weight,
            self.q_norm.eps,
            cos,
            sin,
        )
        v = v.reshape(num_tokens, -1, self.head_dim)
        if backend is None:
            out = causal_attention(q, k, v, self.scale)
        else:
            out = backend(self.layer_idx, q, k, v, self.scale)
        return self.o_proj(out.reshape(num_tokens, -1))
