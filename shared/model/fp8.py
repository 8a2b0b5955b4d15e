"""Block FP8 language models: the modules an FP8 checkpoint stores quantized, swapped in before
loading, or quantized after loading a bf16 / fp32 checkpoint (``--quantization fp8``).

What is quantized is what Qwen's published FP8 checkpoints quantize: the attention projections
(and a dense MLP's), and the routed experts. The router (``mlp.gate``), the embeddings,
``lm_head``, the norms and the whole vision tower stay in the model dtype. A module is FP8 when
its ``weight_scale_inv`` is in the checkpoint, so a checkpoint that keeps more modules
unquantized loads too.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from shared.kernels.reference import FP8_DTYPE
from shared.model.layers.linear import Fp8Linear, Linear
from shared.model.layers.moe import Experts

QUANTIZATIONS = ("fp8",)  # what --quantization accepts

# Our module names of the linears FP8 covers (decoder layers only: never lm_head or the tower).
_QUANTIZABLE = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


def quantizable(module_name: str, module: nn.Module) -> bool:
    """Whether FP8 covers this module of the language model (as Qwen quantizes it)."""
    if isinstance(module, Experts):
        return True
    return type(module) is Linear and _QUANTIZABLE.search(module_name) is not None


def use_fp8(model: nn.Module, stored_fp8: Callable[[str], bool]) -> int:
    """Swap in empty FP8 modules (meta device) wherever `stored_fp8(module name)` says the
    checkpoint holds FP8 weights; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if not (quantizable(name, module) and stored_fp8(name)):
            continue
        if isinstance(module, Experts):
            module.use_fp8()
        else:
            model.set_submodule(
                name, Fp8Linear(module.in_features, module.out_features, device="meta")
            )
        count += 1
    return count


def quantize_fp8(model: nn.Module) -> int:
    """Quantize a loaded model's projections and experts in place (each 128x128 block to e4m3
    with its own scale; a rank quantizes its own slices); returns how many modules. Modules
    already FP8 are left as they are."""
    count = 0
    for name, module in list(model.named_modules()):
        if not quantizable(name, module):
            continue
        if isinstance(module, Experts):
            if module.is_fp8:
                continue
            module.quantize_fp8()
        else:
            model.set_submodule(name, Fp8Linear.quantized(module.weight))
        count += 1
    return count


def resident_bytes(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the model's parameters, each tensor once: as they are, or (a model on the meta
    device) with every float parameter but FP8 weights and their fp32 scales in `dtype`."""
    total = 0
    for name, p in model.named_parameters():
        fixed = p.dtype == FP8_DTYPE or name.endswith("_scale_inv")
        size = p.element_size() if dtype is None or fixed else dtype.itemsize
        total += p.numel() * size
    return total


def is_fp8(model: nn.Module) -> bool:
    """Whether any module of the model holds FP8 weights."""
    return any(
        isinstance(m, Fp8Linear) or (isinstance(m, Experts) and m.is_fp8) for m in model.modules()
    )
