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

from scripts.shapes_vl.data import COLORS, SHAPES, Scene, random_scene, render, render_mask

# A token is labelled with a shape when that shape covers at least this fraction of it.
TOKEN_COVER_FRAC = 0.15
NUM_KIND_CLASSES = 1 + len(SHAPES)  # 0 = background
NUM_COLOR_CLASSES = 1 + len(COLORS)


@dataclass(frozen=True)
class WarmupConfig:
    """Settings of the vision warm-up stage."""

    seed: int = 0
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    log_every: int = 50


@dataclass(frozen=True)
class TokenTargets:
    """Per merged token: shape kind class, colour class (0 = background) and centre (x, y)."""

    kind: torch.Tensor  # [num_tokens] long
    color: torch.Tensor  # [num_tokens] long
    centre: torch.Tensor  # [num_tokens, 2] fp32 in [0, 1]


def token_targets(
    scene: Scene, grid_thw: tuple[int, int, int], patch: int, merge: int
) -> TokenTargets:
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


def targets_for(scenes: list[Scene], grids: torch.Tensor, patch: int, merge: int) -> TokenTargets:
    """Token labels of a batch of scenes, concatenated in the tower's output order."""
    targets = [
        token_targets(s, tuple(g.tolist()), patch, merge)
        for s, g in zip(scenes, grids, strict=True)
    ]
    return TokenTargets(
        kind=torch.cat([t.kind for t in targets]),
        color=torch.cat([t.color for t in targets]),
        centre=torch.cat([t.centre for t in targets]),
    )


def make_head(visual: nn.Module) -> nn.Linear:
    """The throwaway per-token head: kind logits, colour logits, centre (x, y)."""
    return nn.Linear(
        visual.merger.linear_fc2.out_features, NUM_KIND_CLASSES + NUM_COLOR_CLASSES + 2
    )


def token_loss(
    head: nn.Linear, tokens: torch.Tensor, targets: TokenTargets
) -> tuple[torch.Tensor, float, float]:
    """(loss, shape accuracy on shape tokens, centre MSE) of the head on merged tokens."""
    out = head(tokens)  # tokens: [num_tokens, out_hidden]
    kind_logits = out[:, :NUM_KIND_CLASSES]
    color_logits = out[:, NUM_KIND_CLASSES : NUM_KIND_CLASSES + NUM_COLOR_CLASSES]
    centre_mse = F.mse_loss(out[:, -2:], targets.centre)
    # x10: the centre error is small in absolute terms; this keeps it on par with the CEs.
    loss = (
        F.cross_entropy(kind_logits, targets.kind)
        + F.cross_entropy(color_logits, targets.color)
        + 10 * centre_mse
    )
    fg = targets.kind > 0
    kind_acc = (kind_logits.argmax(-1)[fg] == targets.kind[fg]).float().mean()
    return loss, kind_acc.item(), centre_mse.item()


class TokenCapture:
    """Forward hook keeping the tower's merged tokens (pooler_output) from the last forward."""

    def __init__(self, visual: nn.Module):
        self.tokens: torch.Tensor | None = None
        self._handle = visual.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.tokens = output.pooler_output

    def remove(self) -> None:
        """Detach the hook from the tower."""
        self._handle.remove()


def warm_up_vision(visual: nn.Module, image_processor, cfg: WarmupConfig) -> nn.Linear:
    """Train `visual` (transformers' Qwen3-VL vision tower) in place on per-token labels.

    Returns the trained head, so the full training can keep the labels as an auxiliary loss.
    """
    rng = random.Random(cfg.seed + 4)
    torch.manual_seed(cfg.seed + 4)
    head = make_head(visual)
    params = list(visual.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    patch, merge = image_processor.patch_size, image_processor.merge_size
    visual.train()
    start = time.monotonic()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 50)
        scenes = [random_scene(rng) for _ in range(cfg.batch_size)]
        features = image_processor(images=[render(s, rng) for s in scenes], return_tensors="pt")
        grids = features["image_grid_thw"].long()
        tokens = visual(features["pixel_values"].float(), grid_thw=grids).pooler_output
        loss, kind_acc, centre_mse = token_loss(
            head, tokens, targets_for(scenes, grids, patch, merge)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_every == 0:
            print(
                f"vision step {step + 1}/{cfg.steps} loss {loss.item():.3f} "
                f"shape-token acc {kind_acc:.2f} centre mse {centre_mse:.4f} "
                f"{time.monotonic() - start:.0f}s",
                flush=True,
            )
    return head
