"""The video fine-tune: deterministic for a seed, it changes the language model (and the vision
tower only when asked), and its output directory keeps the checkpoint's files."""

from __future__ import annotations

import json

import torch

from scripts.shapes_vl.modelcfg import video_preprocessor_config_dict
from scripts.shapes_vl.train import build_model, write_static_files
from scripts.shapes_vl.train_video import (
    STATIC_FILES,
    VideoTrainConfig,
    lr_at,
    prepare_out_dir,
    train_video,
)
from tests.shapes_vl.test_checkpoint import TINY


def test_lr_schedule_warms_up_then_decays():
    cfg = VideoTrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_frac=0.1)
    assert abs(lr_at(0, cfg) - 1e-4) < 1e-12 and abs(lr_at(9, cfg) - 1e-3) < 1e-12
    assert lr_at(99, cfg) < lr_at(50, cfg) < 1e-3


def test_fine_tune_is_deterministic_for_a_seed(tmp_path):
    from transformers import AutoImageProcessor

    tokenizer, config = write_static_files(tmp_path, TINY, seed=0, corpus_size=300)
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)

    def run(vision_lr_scale: float) -> tuple[dict, dict]:
        cfg = VideoTrainConfig(
            steps=2,
            image_batch=1,
            video_batch=2,
            warmup_steps=1,
            probe_every=0,
            vision_lr_scale=vision_lr_scale,
        )
        torch.manual_seed(0)
        model = build_model(config)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        train_video(model, tokenizer, image_processor, cfg)
        assert all(p.requires_grad for p in model.parameters())
        return before, model.state_dict()

    before, first = run(0.0)
    _, second = run(0.0)
    assert all(torch.equal(first[k], second[k]) for k in first)
    changed = {k for k in first if not torch.equal(first[k], before[k])}
    assert any("experts" in k for k in changed) and not any("visual" in k for k in changed)
    _, unfrozen = run(0.5)
    assert any("visual" in k and not torch.equal(unfrozen[k], before[k]) for k in unfrozen)


def test_out_dir_keeps_the_checkpoint_files(tmp_path):
    init, out = tmp_path / "init", tmp_path / "out"
    init.mkdir()
    write_static_files(init, TINY, seed=0, corpus_size=300)
    prepare_out_dir(init, out, TINY)
    for name in STATIC_FILES:
        assert (out / name).read_bytes() == (init / name).read_bytes(), name
    written = json.loads((out / "video_preprocessor_config.json").read_text())
    assert written == json.loads(json.dumps(video_preprocessor_config_dict(TINY)))
