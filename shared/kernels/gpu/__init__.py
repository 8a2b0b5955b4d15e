"""Triton kernels for the CUDA fast path, behind the reference signatures.

``fused_moe`` (``fused_moe_fp8``, ``fp8_linear`` for block FP8 weights), ``paged_decode``,
``paged_prefill`` and the small fused ops around them
(``add_rms_norm``, ``qk_norm_rope``, ``router_topk``, ``kv_store``) take exactly the arguments of
the ``shared.kernels.reference`` functions; ``shared.kernels.select`` picks them on CUDA when
``available()``. None reads a device value on the host, allocates a data-dependent size or
launches a data-dependent grid, so decode steps built on them can be captured in CUDA graphs.
``TRITON_INTERPRET=1`` (set before this package is imported) runs the same kernels on CPU
tensors through Triton's interpreter; that is how the CPU test suite checks them. On a GPU,
`warmup.warm_up` compiles every variant a server can launch when it starts.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if _HAS_TRITON:
    from shared.kernels.gpu import (
        attention_triton,
        fp8_triton,
        fused_triton,
        moe_triton,
        prefill_triton,
    )

    if interpreting():
        from shared.kernels.gpu import interpreter_compat

        interpreter_compat.apply()


# Block FP8 on GPUs: w8a8, each activation tile quantized per row to e4m3 inside the GEMM
# (what the checkpoints' "activation_scheme": "dynamic" asks, and what vLLM, SGLang and DeepSeek
# run), so prefill's GEMMs run on FP8 tensor cores. False: w8a16 (the weights widened to bf16
# in the kernel). `python -m bench.kernels_triton --fp8` times both on a GPU.
FP8_ACT_QUANT = True


def fp8_act_quant(dtype: torch.dtype) -> bool:
    """The FP8 variant for activations of `dtype`: fp32 ones always take w8a8, since an fp32
    dot 128 deep (w8a16's) spills registers on sm_90."""
    return FP8_ACT_QUANT or dtype == torch.float32


def available() -> bool:
    """Triton imports and can run here: on a CUDA device, or in the interpreter."""
    return _HAS_TRITON and (interpreting() or torch.cuda.is_available())


def fused_moe(x, gate_up, down, weights, ids) -> torch.Tensor:
    """See shared.kernels.reference.fused_moe_torch."""
    return moe_triton.fused_moe_triton(x, gate_up, down, weights, ids)


def fused_moe_fp8(x, gate_up, down, gate_up_scale, down_scale, weights, ids) -> torch.Tensor:
    """See shared.kernels.reference.fused_moe_fp8_torch."""
    scales = (gate_up_scale, down_scale)
    return moe_triton.fused_moe_triton(
        x, gate_up, down, weights, ids, scales=scales, act_quant=fp8_act_quant(x.dtype)
    )


def fp8_linear(x, weight, scale) -> torch.Tensor:
    """See shared.kernels.reference.fp8_linear_torch."""
    return fp8_triton.fp8_linear_triton(x, weight, scale, act_quant=fp8_act_quant(x.dtype))


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """See shared.kernels.reference.paged_decode_torch."""
    return attention_triton.paged_decode_triton(
        q, k_cache, v_cache, block_tables, context_lens, scale
    )


def paged_prefill(q, k, v, k_cache, v_cache, block_table, context_start, scale) -> torch.Tensor:
    """See shared.kernels.reference.paged_prefill_torch."""
    return prefill_triton.paged_prefill_triton(
        q, k, v, k_cache, v_cache, block_table, context_start, scale
    )


def add_rms_norm(x, residual, weight, eps):
    """See shared.kernels.reference.add_rms_norm_torch."""
    return fused_triton.add_rms_norm_triton(x, residual, weight, eps)


def qk_norm_rope(q, k, q_weight, k_weight, eps, cos, sin):
    """See shared.kernels.reference.qk_norm_rope_torch."""
    return fused_triton.qk_norm_rope_triton(q, k, q_weight, k_weight, eps, cos, sin)


def router_topk(logits, top_k, renormalize, num_valid_tokens=None):
    """See shared.kernels.reference.router_topk_torch."""
    return fused_triton.router_topk_triton(logits, top_k, renormalize, num_valid_tokens)


def kv_store(k, v, k_cache, v_cache, slots):
    """See shared.kernels.reference.kv_store_torch."""
    return fused_triton.kv_store_triton(k, v, k_cache, v_cache, slots)
