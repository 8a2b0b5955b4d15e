"""Teach the trained shapes model the video task: fine-tune it on image and video conversations.

    .venv/bin/python -m scripts.shapes_vl.train_video --init-from models/shapes-vl \\
        --out models/shapes-vl

Starts from the checkpoint's weights and keeps its tokenizer (the timestamps `<1.4 seconds>` are
spelled by its byte-level BPE), writes `video_preprocessor_config.json`, and trains every step on
a batch of image conversations (the image task, so the model keeps it) and one of clip
conversations (`video_data`): each clip is rendered, encoded to h264 mp4 and decoded and sampled
back through `shared.model.video_decode.load_video`, the services' path, so training sees the
codec's losses and the sampling evaluation and serving use. Loss covers the answers only.
Deterministic for a seed with the same thread count on the same machine.
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from scripts.shapes_vl.checkpoint import write_json
from scripts.shapes_vl.data import QUESTION_KINDS, make_conversation, make_dataset
from scripts.shapes_vl.modelcfg import SmallModelConfig, video_preprocessor_config_dict
from scripts.shapes_vl.prompts import IGNORE_INDEX
from scripts.shapes_vl.train import TrainConfig, save_weights
from scripts.shapes_vl.video_data import (
    VIDEO_KINDS,
    make_video_conversation,
    make_video_dataset,
    video_processor_config,
)
from scripts.shapes_vl.video_prompts import SampledVideo, make_mixed_batch
from shared.model.video_decode import load_video
from shared.wire.images import VideoSampling

# Files a fine-tune copies unchanged from the checkpoint it starts from.
STATIC_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class VideoTrainConfig:
    """Fine-tuning settings."""

    seed: int = 0
    steps: int = 600
    image_batch: int = 8
    video_batch: int = 8
    lr: float = 2e-4
    min_lr_frac: float = 0.05
    warmup_steps: int = 50
    weight_decay: float = 0.01
    # Learning-rate factor of the vision tower (0 freezes it).
    vision_lr_scale: float = 0.0
    max_turns: int = 3
    log_every: int = 25
    # Teacher-forced exact match on fixed probe sets (seeds seed + 3 and seed + 6, never
    # trained on) every N steps.
    probe_every: int = 100
    probe_images: int = 100
    probe_videos: int = 90
    threads: int = 1


def lr_at(step: int, cfg: VideoTrainConfig) -> float:
    """Linear warm-up, then cosine decay (train.lr_at's schedule)."""
    from scripts.shapes_vl.train import lr_at as base_lr_at

    return base_lr_at(
        step,
        TrainConfig(
            steps=cfg.steps, lr=cfg.lr, min_lr_frac=cfg.min_lr_frac, warmup_steps=cfg.warmup_steps
        ),
    )


def sample_clip(data: bytes, cfg) -> SampledVideo:
    """A clip's bytes decoded, sampled and preprocessed as the encode service does."""
    clip = load_video(data, (), VideoSampling(), cfg)
    return SampledVideo(clip.pixel_values, clip.grid_thw, clip.timestamps)


def probe_batches(tokenizer, image_processor, video_cfg, cfg: VideoTrainConfig):
    """(batch, kinds) of the held-back probe sets: one-question images and clips."""
    images = make_dataset(cfg.seed + 3, cfg.probe_images)
    videos = make_video_dataset(cfg.seed + 6, cfg.probe_videos)
    image_batch = make_mixed_batch(
        tokenizer, image_processor, [(e.image, [(e.question, e.answer)]) for e in images], []
    )
    video_batch = make_mixed_batch(
        tokenizer,
        image_processor,
        [],
        [(sample_clip(e.data, video_cfg), [(e.question, e.answer)]) for e in videos],
    )
    return (image_batch, [e.kind for e in images]), (video_batch, [e.kind for e in videos])


def exact_by_kind(model, batch, kinds: list[str], chunk: int = 32) -> dict[str, float]:
    """Teacher-forced exact match per kind (train.exact_by_kind, in chunks of rows)."""
    model.eval()
    oks = []
    with torch.no_grad():
        inputs = batch.model_inputs()
        logits = model(**inputs).logits[:, :-1]
        targets = batch.labels[:, 1:]
        oks = ((logits.argmax(-1) == targets) | (targets == IGNORE_INDEX)).all(dim=1)
    model.train()
    order = [k for k in (*QUESTION_KINDS, *VIDEO_KINDS) if k in kinds]
    return {
        k: float(oks[[i for i, kk in enumerate(kinds) if kk == k]].float().mean()) for k in order
    }


def _param_groups(model, cfg: VideoTrainConfig):
    groups = []
    for vision in (False, True):
        named = [
            (n, p)
            for n, p in model.named_parameters()
            if ("visual" in n) == vision and p.requires_grad
        ]
        scale = cfg.vision_lr_scale if vision else 1.0
        for decayed in (True, False):
            params = [p for n, p in named if (p.ndim >= 2 and "embed" not in n) == decayed]
            if params:
                wd = cfg.weight_decay if decayed else 0.0
                groups.append({"params": params, "weight_decay": wd, "scale": scale})
    return groups


def train_video(model, tokenizer, image_processor, cfg: VideoTrainConfig) -> None:
    """Fine-tune `model` in place on mixed image and clip conversations."""
    video_cfg = video_processor_config()
    probes = probe_batches(tokenizer, image_processor, video_cfg, cfg) if cfg.probe_every else ()
    if cfg.vision_lr_scale == 0:
        model.model.visual.requires_grad_(False)
    groups = _param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    weights = TrainConfig().first_kind_weights
    rng = random.Random(cfg.seed + 5)
    model.train()
    start, running = time.monotonic(), [0.0, 0.0]
    for step in range(cfg.steps):
        firsts = rng.choices(QUESTION_KINDS, weights=weights, k=cfg.image_batch)
        image_convs = [
            make_conversation(rng, rng.randint(1, cfg.max_turns), 3, kind) for kind in firsts
        ]
        video_convs = [
            make_video_conversation(rng, rng.randint(1, cfg.max_turns))
            for _ in range(cfg.video_batch)
        ]
        batch = make_mixed_batch(
            tokenizer,
            image_processor,
            [(c[0].image, [(e.question, e.answer) for e in c]) for c in image_convs],
            [
                (sample_clip(c[0].data, video_cfg), [(e.question, e.answer) for e in c])
                for c in video_convs
            ],
        )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg) * group["scale"]
        out = model(**batch.model_inputs(), labels=batch.labels, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running[0] += out.loss.item()
        if (step + 1) % cfg.log_every == 0:
            print(
                f"step {step + 1}/{cfg.steps} loss {running[0] / cfg.log_every:.4f} "
                f"lr {lr_at(step, cfg):.2e} {time.monotonic() - start:.0f}s",
                flush=True,
            )
            running[0] = 0.0
        if cfg.probe_every and (step + 1) % cfg.probe_every == 0:
            for name, (probe, kinds) in zip(("images", "videos"), probes, strict=True):
                scores = exact_by_kind(model, probe, kinds)
                line = " ".join(f"{k} {v:.2f}" for k, v in scores.items())
                print(f"  probe {name}: {line}", flush=True)
    model.requires_grad_(True)
    model.eval()


def prepare_out_dir(init_from: Path, out: Path, model_cfg: SmallModelConfig) -> None:
    """The checkpoint's static files in `out` (unchanged) and the video processor config."""
    out.mkdir(parents=True, exist_ok=True)
    if init_from.resolve() != out.resolve():
        for name in STATIC_FILES:
            shutil.copyfile(init_from / name, out / name)
    write_json(out / "video_preprocessor_config.json", video_preprocessor_config_dict(model_cfg))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init-from", type=Path, default=Path("models/shapes-vl"))
    parser.add_argument("--out", type=Path, default=Path("models/shapes-vl"))
    parser.add_argument("--seed", type=int, default=VideoTrainConfig.seed)
    parser.add_argument("--steps", type=int, default=VideoTrainConfig.steps)
    parser.add_argument("--lr", type=float, default=VideoTrainConfig.lr)
    parser.add_argument("--vision-lr-scale", type=float, default=VideoTrainConfig.vision_lr_scale)
    parser.add_argument("--probe-every", type=int, default=VideoTrainConfig.probe_every)
    parser.add_argument(
        "--threads",
        type=int,
        default=VideoTrainConfig.threads,
        help="torch threads (results are deterministic for a seed and thread count)",
    )
    args = parser.parse_args(argv)
    cfg = VideoTrainConfig(
        seed=args.seed,
        steps=args.steps,
        lr=args.lr,
        vision_lr_scale=args.vision_lr_scale,
        probe_every=args.probe_every,
        threads=args.threads,
    )
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    from tokenizers import Tokenizer
    from transformers import AutoImageProcessor, Qwen3VLMoeForConditionalGeneration

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(
        args.init_from,
        dtype=torch.float32,
        attn_implementation="sdpa",
        experts_implementation="grouped_mm",
    )
    tokenizer = Tokenizer.from_file(str(args.init_from / "tokenizer.json"))
    image_processor = AutoImageProcessor.from_pretrained(args.init_from)
    model_cfg = SmallModelConfig()
    start = time.monotonic()
    train_video(model, tokenizer, image_processor, cfg)
    print(f"training took {time.monotonic() - start:.0f}s", flush=True)
    prepare_out_dir(args.init_from, args.out, model_cfg)
    save_weights(model, args.out, model_cfg)
    print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
