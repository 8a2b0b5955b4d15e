"""bf16 expert weights with fp32 compute, the language model's bf16 on CPUs that only emulate
bf16 arithmetic: loading, the dtype policy, and forward parity with fp32 on the same values."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.language.engine import EngineConfig
from shared.kernels import cpu as cpu_kernels
from shared.model.config import load_config
from shared.model.loader import load_text_model
from shared.model.qwen3_moe import Qwen3MoeForCausalLM
from shared.wire import units

_EXPERTS = ("gate_up_proj", "down_proj")


def _is_expert(name: str) -> bool:
    return ".mlp.experts." in name and name.endswith(_EXPERTS)


def test_only_the_routed_experts_take_the_expert_dtype(tiny_vl_dir):
    model = load_text_model(tiny_vl_dir, torch.float32, expert_dtype=torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    experts = {n for n in dtypes if _is_expert(n)}
    assert experts and {dtypes[n] for n in experts} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if n not in experts} == {torch.float32}


def _forward(model: Qwen3MoeForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("num_tokens", [1, 7, 300])  # decode-sized and prefill-sized batches
def test_bf16_experts_compute_like_fp32_on_the_same_values(tiny_vl_dir, num_tokens):
    """The kernel widens the bf16 weights exactly: the forward equals fp32 with the experts
    rounded to bf16 beforehand (within fp32 accumulation-order noise)."""
    mixed = load_text_model(tiny_vl_dir, torch.float32, expert_dtype=torch.bfloat16)
    rounded = load_text_model(tiny_vl_dir, torch.float32)
    for name, p in rounded.named_parameters():
        if _is_expert(name):
            p.data = p.data.to(torch.bfloat16).float()
    vocab = load_config(tiny_vl_dir).text.vocab_size
    ids = torch.randint(0, vocab, (num_tokens,), generator=torch.Generator().manual_seed(3))
    a, b = _forward(mixed, ids), _forward(rounded, ids)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("requested", "checkpoint", "native", "expected"),
    [
        ("bfloat16", torch.float32, False, (torch.float32, torch.bfloat16)),
        ("bfloat16", torch.float32, True, (torch.bfloat16, None)),
        ("auto", torch.bfloat16, False, (torch.float32, torch.bfloat16)),  # lossless widening
        ("auto", torch.bfloat16, True, (torch.bfloat16, None)),
        ("auto", torch.float32, False, (torch.float32, None)),
        ("float32", torch.bfloat16, False, (torch.float32, None)),
    ],
)
def test_model_dtypes_policy(tiny_vl_dir, monkeypatch, requested, checkpoint, native, expected):
    monkeypatch.setattr(units, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(cpu_kernels, "available", lambda: True)
    model_config = dataclasses.replace(load_config(tiny_vl_dir), dtype=checkpoint)
    assert EngineConfig(dtype=requested, device="cpu").model_dtypes(model_config) == expected


def test_without_the_cpu_kernels_bf16_computes_in_fp32_throughout(tiny_vl_dir, monkeypatch):
    monkeypatch.setattr(units, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    config = EngineConfig(dtype="bfloat16", device="cpu")
    assert config.model_dtypes(load_config(tiny_vl_dir)) == (torch.float32, None)
