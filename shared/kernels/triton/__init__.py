"""Triton kernels for the CUDA fast path, behind the reference signatures.

``fused_moe``, ``paged_decode`` and ``paged_prefill`` take exactly the arguments of the
``shared.kernels`` references; ``shared.kernels.select`` picks them on CUDA when
``available()``. None reads a device value on the host, allocates a data-dependent size or
launches a data-dependent grid, so decode steps built on them can be captured in CUDA graphs.
``TRITON_INTERPRET=1`` (set before this package is imported) runs the same kernels on CPU
tensors through Triton's interpreter; that is how the CPU test suite checks them.
"""

from __future__ import annotations

import importlib.util
import os

import torch

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Submodules load before the wrappers below are defined: importing a submodule binds its name
# on the package, and the wrapper `fused_moe` must be what that name ends up meaning.
if _HAS_TRITON:
    from shared.kernels.triton import fused_moe as _moe
    from shared.kernels.triton import paged_attention as _attention

    if interpreting():
        from shared.kernels.triton import interpreter_compat

        interpreter_compat.apply()
else:  # pragma: no cover - triton is a dependency of the CUDA images and of dev installs
    _moe = _attention = None


def available() -> bool:
    """Triton imports and can run here: on a CUDA device, or in the interpreter."""
    return _HAS_TRITON and (interpreting() or torch.cuda.is_available())


def fused_moe(x, gate_up, down, weights, ids) -> torch.Tensor:
    """See shared.kernels.moe.fused_moe_torch."""
    return _moe.fused_moe_triton(x, gate_up, down, weights, ids)


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """See shared.kernels.attention.paged_decode_torch."""
    return _attention.paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_prefill(q, k, v, k_cache, v_cache, block_table, context_start, scale) -> torch.Tensor:
    """See shared.kernels.attention.paged_prefill_torch."""
    return _attention.paged_prefill_triton(
        q, k, v, k_cache, v_cache, block_table, context_start, scale
    )
