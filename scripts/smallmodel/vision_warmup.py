"""Vision warm-up: dense per-token labels teach the tower shapes and positions before the VLM loss.

Trained from scratch through the language loss alone, the tower learns colour (a per-pixel
property) quickly but shape and position barely at all: the language model cannot learn to read
features the tower does not produce yet, so the tower gets almost no signal for them. Real VLMs
start from a pretrained vision encoder for this reason. Here the tower is first trained alone with
a throwaway linear head on its merged tokens that predicts, per token, the kind and colour of the
shape covering it and the token's centre in the image. The language model then trains on top.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from scripts.smallmodel.data import COLORS, SHAPES, Scene, random_scene, render, render_mask

# A token is labelled with a shape when that shape covers at least this fraction of it.
TOKEN_COVER_FRAC = 0.15
NUM_KIND_CLASSES = 1 + len(SHAPES)  # 0 = background
NUM_COLOR_CLASSES = 1 + len(COLORS)


@dataclass(frozen=True)
class WarmupConfig:
    """Settings of the vision warm-up stage."""

    seed: int = 0
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    log_every: int = 50


@dataclass(frozen=True)
class TokenTargets:
    """Per merged token: shape kind class, colour class (0 = background) and centre (x, y)."""

    kind: torch.Tensor  # [num_tokens] long
    color: torch.Tensor  # [num_tokens] long
    centre: torch.Tensor  # [num_tokens, 2] fp32 in [0, 1]


def token_targets(scene: Scene, grid_thw: tuple[int, int, int], patch: int,
                  merge: int) -> TokenTargets:
    """Labels of the merged tokens (raster order) of `scene` resized to `grid_thw` patches."""
    _, gh, gw = grid_thw
    cell, rows, cols = patch * merge, gh // merge, gw // merge
    mask = np.asarray(render_mask(scene).resize((gw * patch, gh * patch), Image.NEAREST))
    cells = mask.reshape(rows, cell, cols, cell).transpose(0, 2, 1, 3).reshape(rows * cols, -1)
    cover = np.stack([(cells == i + 1).mean(axis=1) for i in range(len(scene.shapes))], axis=1)
    best = cover.argmax(axis=1)
    covered = cover.max(axis=1) >= TOKEN_COVER_FRAC
    kinds = np.array([1 + SHAPES.index(s.kind) for s in scene.shapes])
    colors = np.array([1 + list(COLORS).index(s.color) for s in scene.shapes])
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    centre = np.stack([(c.ravel() + 0.5) / cols, (r.ravel() + 0.5) / rows], axis=1)
    return TokenTargets(
        kind=torch.from_numpy(np.where(covered, kinds[best], 0)).long(),
        color=torch.from_numpy(np.where(covered, colors[best], 0)).long(),
        centre=torch.from_numpy(centre).float(),
    )


def _batch(rng: random.Random, image_processor, size: int):
    scenes = [random_scene(rng) for _ in range(size)]
    features = image_processor(images=[render(s, rng) for s in scenes], return_tensors="pt")
    grids = features["image_grid_thw"].long()
    patch, merge = image_processor.patch_size, image_processor.merge_size
    targets = [token_targets(s, tuple(g.tolist()), patch, merge)
               for s, g in zip(scenes, grids, strict=True)]
    return features["pixel_values"].float(), grids, TokenTargets(
        kind=torch.cat([t.kind for t in targets]),
        color=torch.cat([t.color for t in targets]),
        centre=torch.cat([t.centre for t in targets]),
    )


def _losses(visual, head: nn.Linear, pixel_values, grids, targets: TokenTargets):
    tokens = visual(pixel_values, grid_thw=grids).pooler_output  # [num_tokens, out_hidden]
    out = head(tokens)
    kind_logits = out[:, :NUM_KIND_CLASSES]
    color_logits = out[:, NUM_KIND_CLASSES:NUM_KIND_CLASSES + NUM_COLOR_CLASSES]
    kind_loss = F.cross_entropy(kind_logits, targets.kind)
    color_loss = F.cross_entropy(color_logits, targets.color)
    centre_loss = F.mse_loss(out[:, -2:], targets.centre) * 10
    fg = targets.kind > 0
    kind_acc = (kind_logits.argmax(-1)[fg] == targets.kind[fg]).float().mean()
    return kind_loss + color_loss + centre_loss, float(kind_acc), float(centre_loss.detach())


def warm_up_vision(visual: nn.Module, image_processor, cfg: WarmupConfig) -> None:
    """Train `visual` (transformers' Qwen3-VL vision tower) in place on per-token labels."""
    rng = random.Random(cfg.seed + 4)
    torch.manual_seed(cfg.seed + 4)
    head = nn.Linear(visual.merger.linear_fc2.out_features,
                     NUM_KIND_CLASSES + NUM_COLOR_CLASSES + 2)
    params = list(visual.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    visual.train()
    start = time.monotonic()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 50)
        loss, kind_acc, centre_loss = _losses(visual, head, *_batch(rng, image_processor,
                                                                    cfg.batch_size))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_every == 0:
            print(f"vision step {step + 1}/{cfg.steps} loss {loss.item():.3f} "
                  f"shape-token acc {kind_acc:.2f} centre mse {centre_loss / 10:.4f} "
                  f"{time.monotonic() - start:.0f}s", flush=True)
