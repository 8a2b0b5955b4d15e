"""Parity of the text-only Qwen3-MoE path (per-expert checkpoint layout, 1-D RoPE) with
transformers."""

from __future__ import annotations

import pytest
import torch

from shared.model.config import load_config
from shared.model.loader import load_text_model
from tests.tiny import make_text_checkpoint


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_text_parity(tmp_path, norm_topk_prob):
    hf = make_text_checkpoint(tmp_path, seed=7, norm_topk_prob=norm_topk_prob)
    assert load_config(tmp_path).text.norm_topk_prob is norm_topk_prob
    model = load_text_model(tmp_path)
    ids = torch.randint(0, 320, (29,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids)
        want = hf(input_ids=ids[None]).logits[0]
    assert (got - want).abs().max().item() <= 1e-4


def test_logits_indices_select_rows(tiny_vl_dir):
    model = load_text_model(tiny_vl_dir)
    ids = torch.arange(12)
    with torch.no_grad():
        full = model(ids)
        some = model(ids, logits_indices=torch.tensor([3, 11]))
    assert some.shape == (2, 320)
    assert torch.allclose(some, full[[3, 11]], atol=1e-6)


def test_fused_projections_give_the_same_logits(tmp_path):
    make_text_checkpoint(tmp_path, seed=3, decoder_sparse_step=2, intermediate_size=64)
    model = load_text_model(tmp_path)
    ids = torch.arange(5, 30)
    with torch.no_grad():
        before = model(ids)
        after = model.fuse_projections()(ids)
    assert model.model.layers[0].self_attn.qkv_proj is not None
    assert (after - before).abs().max().item() <= 1e-6
