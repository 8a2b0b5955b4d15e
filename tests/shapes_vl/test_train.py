"""The training loop: deterministic for a seed, and it changes the weights."""

from __future__ import annotations

import pytest
import torch

from scripts.shapes_vl.train import TrainConfig, build_model, lr_at, train, write_static_files
from tests.shapes_vl.test_checkpoint import TINY


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_frac=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) < lr_at(20, cfg) < 1e-3
    assert lr_at(99, cfg) == pytest.approx(1e-4, rel=0.01)


def test_training_is_deterministic_for_a_seed(tmp_path):
    from transformers import AutoImageProcessor

    tokenizer, config = write_static_files(tmp_path, TINY, seed=0, corpus_size=300)
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    cfg = TrainConfig(
        steps=3, batch_size=2, warmup_steps=1, probe_every=0, log_every=10, curriculum=(0.3, 0.6)
    )

    def run() -> tuple[dict, dict]:
        torch.manual_seed(cfg.seed)
        model = build_model(config)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train(model, tokenizer, image_processor, cfg)
        return before, model.state_dict()

    before, first = run()
    _, second = run()
    assert all(torch.equal(first[k], second[k]) for k in first)
    changed = [k for k in first if not torch.equal(first[k], before[k])]
    assert any("visual" in k for k in changed) and any("experts" in k for k in changed)
