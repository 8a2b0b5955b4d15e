"""Which implementation runs each kernel on each device.

Backends are modules exposing the reference functions' signatures (`linear`, `fused_moe`,
`fused_moe_fp8`, `fp8_linear`, `paged_decode`, `paged_prefill`, `add_rms_norm`,
`qk_norm_rope`, `router_topk`, `kv_store`, each optional): `shared.kernels.cpu` on CPUs when
its extension compiled on this machine, `shared.kernels.gpu` on CUDA when Triton imports. A
missing backend or operation falls back to the PyTorch reference. ``SPLITVL_KERNELS=torch``
forces the references (the parity baseline); ``SPLITVL_KERNELS=gpu`` the Triton kernels on
every device (CPU tensors then run in Triton's interpreter, TRITON_INTERPRET=1: how the CUDA
selection's launches are counted without a GPU). The choice is made once per device type.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

from shared.kernels.reference import (
    add_rms_norm_torch,
    fp8_linear_torch,
    fused_moe_fp8_torch,
    fused_moe_torch,
    kv_store_torch,
    paged_decode_torch,
    paged_prefill_torch,
    qk_norm_rope_torch,
    router_topk_torch,
)

log = logging.getLogger(__name__)

_REFERENCES: dict[str, Callable] = {
    "linear": F.linear,
    "fused_moe": fused_moe_torch,
    "fused_moe_fp8": fused_moe_fp8_torch,
    "fp8_linear": fp8_linear_torch,
    "paged_decode": paged_decode_torch,
    "paged_prefill": paged_prefill_torch,
    "add_rms_norm": add_rms_norm_torch,
    "qk_norm_rope": qk_norm_rope_torch,
    "router_topk": router_topk_torch,
    "kv_store": kv_store_torch,
}


@functools.cache
def _backend(device_type: str) -> ModuleType | None:
    """The accelerated backend module for a device type, or None."""
    choice = os.environ.get("SPLITVL_KERNELS", "auto")
    if choice == "torch":
        return None
    name = "gpu" if choice == "gpu" else {"cpu": "cpu", "cuda": "gpu"}.get(device_type)
    if name is None:
        return None
    try:
        module = importlib.import_module(f"shared.kernels.{name}")
        return module if module.available() else None
    except Exception as exc:  # noqa: BLE001 - a broken backend must never stop the model
        log.warning("no %s kernels on %s, using the PyTorch references: %r", name, device_type, exc)
        return None


def backend(device_type: str) -> str:
    """Which kernels run on a device type: "cpu" (C++), "gpu" (Triton) or "torch" (references)."""
    module = _backend(device_type)
    return "torch" if module is None else module.__name__.rsplit(".", 1)[1]


def accelerated(device_type: str) -> bool:
    """Whether a backend of its own (not the PyTorch references) runs kernels on a device type."""
    return _backend(device_type) is not None


@functools.cache
def implementation(name: str, device_type: str) -> Callable:
    """The function running kernel `name` on `device_type` (logged once)."""
    backend = _backend(device_type)
    fn = getattr(backend, name, None) if backend is not None else None
    if fn is None:
        fn = _REFERENCES[name]
    log.info("kernel %s on %s: %s.%s", name, device_type, fn.__module__, fn.__name__)
    return fn


def linear(x, weight, bias=None) -> torch.Tensor:
    """`torch.nn.functional.linear`, the projections of every model."""
    return implementation("linear", x.device.type)(x, weight, bias)


def fused_moe(x, gate_up, down, weights, ids) -> torch.Tensor:
    """See shared.kernels.reference.fused_moe_torch."""
    return implementation("fused_moe", x.device.type)(x, gate_up, down, weights, ids)


def fused_moe_fp8(x, gate_up, down, gate_up_scale, down_scale, weights, ids) -> torch.Tensor:
    """See shared.kernels.reference.fused_moe_fp8_torch (each backend picks w8a16 or w8a8)."""
    fn = implementation("fused_moe_fp8", x.device.type)
    return fn(x, gate_up, down, gate_up_scale, down_scale, weights, ids)


def fp8_linear(x, weight, scale) -> torch.Tensor:
    """See shared.kernels.reference.fp8_linear_torch (each backend picks w8a16 or w8a8)."""
    return implementation("fp8_linear", x.device.type)(x, weight, scale)


def paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """See shared.kernels.reference.paged_decode_torch."""
    fn = implementation("paged_decode", q.device.type)
    return fn(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_prefill(q, k, v, k_cache, v_cache, block_table, context_start, scale) -> torch.Tensor:
    """See shared.kernels.reference.paged_prefill_torch."""
    fn = implementation("paged_prefill", q.device.type)
    return fn(q, k, v, k_cache, v_cache, block_table, context_start, scale)


def add_rms_norm(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """See shared.kernels.reference.add_rms_norm_torch."""
    return implementation("add_rms_norm", x.device.type)(x, residual, weight, eps)


def qk_norm_rope(q, k, q_weight, k_weight, eps, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """See shared.kernels.reference.qk_norm_rope_torch."""
    return implementation("qk_norm_rope", q.device.type)(q, k, q_weight, k_weight, eps, cos, sin)


def router_topk(
    logits, top_k, renormalize, num_valid_tokens=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """See shared.kernels.reference.router_topk_torch."""
    fn = implementation("router_topk", logits.device.type)
    return fn(logits, top_k, renormalize, num_valid_tokens)


def kv_store(k, v, k_cache, v_cache, slots) -> None:
    """See shared.kernels.reference.kv_store_torch."""
    implementation("kv_store", k.device.type)(k, v, k_cache, v_cache, slots)
