"""The split path (vision alone -> bytes -> text model alone) equals the monolithic forward bit for
bit."""

from __future__ import annotations

import numpy as np
import torch

from shared.model.config import load_config
from shared.model.loader import load_text_model, load_vision_model, load_vl_model
from shared.model.processing import mrope_positions
from shared.model.qwen3_vl_moe import (
    separate_deepstack_embeds,
    splice_image_embeds,
)
from tests.model.helpers import images_inputs, prompt_ids
from tests.tiny import IMAGE_TOKEN_ID


def _wire_roundtrip(packed: torch.Tensor) -> torch.Tensor:
    """Raw little-endian bytes with dtype and shape, as the transports carry them."""
    data = packed.contiguous().numpy().astype("<f4").tobytes()
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").copy()).view(packed.shape)


def test_split_equals_monolithic(tiny_vl_dir):
    cfg = load_config(tiny_vl_dir)
    mono = load_vl_model(tiny_vl_dir)
    vision = load_vision_model(tiny_vl_dir)
    text = load_text_model(tiny_vl_dir)
    pv, grid = images_inputs([(96, 64), (64, 128)], seed=11)
    ids = prompt_ids([5, 3, 4], grid.tolist(), seed=2)
    with torch.no_grad():
        want = mono(ids, pv, grid)
        packed = _wire_roundtrip(vision(pv, grid))
        assert packed.shape == (grid.prod(1).sum().item() // 4, 64 * (1 + cfg.num_deepstack))
        embeds, deepstack = separate_deepstack_embeds(packed, cfg.num_deepstack)
        inputs_embeds, full_ds = splice_image_embeds(
            ids, text.embed_tokens(ids), embeds, deepstack, IMAGE_TOKEN_ID
        )
        positions, _ = mrope_positions(ids, grid.tolist(), IMAGE_TOKEN_ID, 2)
        got = text(inputs_embeds=inputs_embeds, positions=positions, input_deepstack_embeds=full_ds)
    assert torch.equal(got, want)


def test_deepstack_changes_logits(tiny_vl_dir):
    """Guard against a silently ignored input_deepstack_embeds."""
    text = load_text_model(tiny_vl_dir)
    ids = torch.arange(10)
    ds = torch.zeros(10, 2 * 64)
    ds[4:6] = 0.5
    with torch.no_grad():
        plain = text(ids)
        zero = text(ids, input_deepstack_embeds=torch.zeros_like(ds))
        with_ds = text(ids, input_deepstack_embeds=ds)
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain, with_ds)
    # Causal: rows before the visual rows are unchanged (up to the float noise of a different
    # expert grouping in the MoE matmuls).
    assert torch.allclose(plain[:4], with_ds[:4], atol=1e-5)
    assert (plain[4:] - with_ds[4:]).abs().max() > 1e-2
