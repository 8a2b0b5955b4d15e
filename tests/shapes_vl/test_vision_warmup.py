"""Vision warm-up: labels follow the shapes through the resize; the stage trains the tower."""

from __future__ import annotations

import torch

from scripts.shapes_vl.data import COLORS, SHAPES, Scene, Shape
from scripts.shapes_vl.vision_warmup import WarmupConfig, token_targets, warm_up_vision


def test_token_targets_mark_the_covered_tokens():
    # 128 x 64 px image, grid 4 x 8 patches -> 2 x 4 merged tokens of 32 x 32 px.
    square = Shape("square", "blue", cx=48.0, cy=16.0, half=15.0)  # inside token (row 0, col 1)
    circle = Shape("circle", "red", cx=112.0, cy=48.0, half=15.0)  # inside token (row 1, col 3)
    scene = Scene(128, 64, (255, 255, 255), False, (square, circle))
    targets = token_targets(scene, (1, 4, 8), patch=16, merge=2)
    kind = targets.kind.view(2, 4)
    color = targets.color.view(2, 4)
    colors = list(COLORS)
    assert kind[0, 1] == 1 + SHAPES.index("square") and color[0, 1] == 1 + colors.index("blue")
    assert kind[1, 3] == 1 + SHAPES.index("circle") and color[1, 3] == 1 + colors.index("red")
    assert int((kind > 0).sum()) == 2 and int((color > 0).sum()) == 2
    centre = targets.centre.view(2, 4, 2)
    assert torch.allclose(centre[0, 0], torch.tensor([0.125, 0.25]))
    assert torch.allclose(centre[1, 3], torch.tensor([0.875, 0.75]))


def test_token_targets_scale_with_the_resize():
    # The same scene drawn at 2x and resized to the same grid gives the same labels.
    small = Scene(64, 64, (0, 0, 0), False, (Shape("triangle", "green", 16.0, 48.0, 14.0),))
    big = Scene(128, 128, (0, 0, 0), False, (Shape("triangle", "green", 32.0, 96.0, 28.0),))
    a = token_targets(small, (1, 4, 4), patch=16, merge=2)
    b = token_targets(big, (1, 4, 4), patch=16, merge=2)
    assert torch.equal(a.kind, b.kind) and a.kind.view(2, 2)[1, 0] == 1 + SHAPES.index("triangle")


def test_warm_up_trains_the_tower_deterministically(tmp_path):
    from transformers import AutoImageProcessor

    from scripts.shapes_vl.train import build_model, write_static_files
    from tests.shapes_vl.test_checkpoint import TINY

    _, config = write_static_files(tmp_path, TINY, seed=0, corpus_size=200)
    image_processor = AutoImageProcessor.from_pretrained(tmp_path)
    cfg = WarmupConfig(steps=2, batch_size=2, log_every=10)

    def run() -> tuple[dict, dict]:
        torch.manual_seed(0)
        model = build_model(config)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        warm_up_vision(model.model.visual, image_processor, cfg)
        return before, model.state_dict()

    before, first = run()
    _, second = run()
    assert all(torch.equal(first[k], second[k]) for k in first)
    changed = {k for k in first if not torch.equal(first[k], before[k])}
    assert changed and all(".visual." in k for k in changed)
