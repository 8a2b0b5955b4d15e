"""Linear projections: plain (`Linear`) or block FP8 (`Fp8Linear`, without bias), and their
fusion into one GEMM."""

from __future__ import annotations

import torch
from torch import nn

from shared.kernels.reference import FP8_BLOCK, FP8_DTYPE, fp8_block_quantize, fp8_blocks
from shared.kernels.select import fp8_linear, linear


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoint names) whose product goes through the
    kernel selection: on a CPU, bf16 rows are padded to a few GEMM shapes (see
    `shared.kernels.cpu.onednn`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Fp8Linear(nn.Module):
    """y = x W^T with W ``[out, in]`` in float8_e4m3fn and one fp32 scale per 128x128 block
    (``weight_scale_inv [ceil(out/128), ceil(in/128)]``), transformers' `FP8Linear` layout:
    checkpoints load into it by name. The kernels widen the weights in registers; x keeps its
    dtype."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
            requires_grad=False,
        )
        self.weight_scale_inv = nn.Parameter(
            torch.empty(fp8_blocks(out_features), fp8_blocks(in_features), device=device),
            requires_grad=False,
        )

    @classmethod
    def quantized(cls, weight: torch.Tensor) -> Fp8Linear:
        """The FP8 projection of a weight ``[out, in]`` of any float dtype."""
        q, scale = fp8_block_quantize(weight)
        module = cls(weight.shape[1], weight.shape[0], device="meta")
        module.weight = nn.Parameter(q, requires_grad=False)
        module.weight_scale_inv = nn.Parameter(scale, requires_grad=False)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 blocks"


def fuse_linears(parts: list[nn.Module]) -> nn.Module | None:
    """One projection whose output is the parts' outputs concatenated, or None where none
    exists: FP8 parts fuse only when every part but the last ends on a 128-row block, since a
    block scale cannot be shared by rows of two parts."""
    if all(type(p) is Linear and p.bias is None for p in parts):
        fused = torch.cat([p.weight for p in parts])
        module = Linear(fused.shape[1], fused.shape[0], bias=False, device="meta")
        module.weight = nn.Parameter(fused, requires_grad=False)
        return module
    if not all(isinstance(p, Fp8Linear) for p in parts):
        return None
    if any(p.out_features % FP8_BLOCK for p in parts[:-1]):
        return None
    module = Fp8Linear(parts[0].in_features, sum(p.out_features for p in parts), device="meta")
    module.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
    scales = torch.cat([p.weight_scale_inv for p in parts])
    module.weight_scale_inv = nn.Parameter(scales, requires_grad=False)
    return module
