"""Train the small Qwen3-VL-MoE shapes model on CPU and save it as a hub-style checkpoint.

    .venv/bin/python -m scripts.shapes_vl.train --out models/shapes-vl

Deterministic for a seed on the same machine and thread count: the tokenizer corpus, the training
stream and the initial weights all come from seeded generators. Loss covers only the answer tokens
(and the closing <|im_end|>).
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scripts.shapes_vl.checkpoint import rewrite_in_hub_layout, write_json
from scripts.shapes_vl.data import QUESTION_KINDS, make_conversation, make_dataset
from scripts.shapes_vl.modelcfg import (
    SmallModelConfig,
    generation_config_dict,
    hf_config_dict,
    padded_vocab_size,
    preprocessor_config_dict,
    video_preprocessor_config_dict,
)
from scripts.shapes_vl.prompts import IGNORE_INDEX, make_batch, make_conversation_batch
from scripts.shapes_vl.tokenizer import build_tokenizer, save_tokenizer, special_token_ids
from scripts.shapes_vl.vision_warmup import (
    TokenCapture,
    WarmupConfig,
    targets_for,
    token_loss,
    warm_up_vision,
)

# A copy of the Qwen3-VL chat template, so regenerating needs nothing outside the repo.
CHAT_TEMPLATE = Path(__file__).with_name("qwen3_vl_chat_template.jinja")
# Large enough that every answer word is one token (the BPE trainer stops near 400 here).
TOKENIZER_VOCAB = 448
TOKENIZER_CORPUS = 4000


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings."""

    seed: int = 0
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_frac: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.01
    # Curriculum: scenes hold at most 1 shape until this fraction of the steps, then at most 2
    # until the next, then up to 3. Single shapes teach colour, shape and position first.
    curriculum: tuple[float, float] = (0.15, 0.35)
    # Each sequence asks 1..max_turns questions of distinct kinds about its image: more
    # supervision per vision forward. The first turn is exactly the single-question format.
    max_turns: int = 3
    # Mix of first questions (QUESTION_KINDS order): "where" and the shape-dependent kinds need
    # more examples before the model reads position and shape instead of guessing the prior.
    first_kind_weights: tuple[float, ...] = (2.5, 1.0, 1.0, 2.5, 1.5)
    # Weight of the vision warm-up's per-token loss during this stage (when a head is given).
    aux_weight: float = 0.5
    log_every: int = 50
    # Teacher-forced exact match on a fixed probe set (seed + 3, never trained on) every N steps.
    probe_every: int = 100
    probe_size: int = 200
    threads: int = 2


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_frac * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * cosine)


def write_static_files(
    out_dir: Path, model_cfg: SmallModelConfig, seed: int, corpus_size: int = TOKENIZER_CORPUS
):
    """Tokenizer, config.json, image and video preprocessor and generation configs; returns
    (tokenizer, config)."""
    corpus = make_dataset(seed + 1, corpus_size)
    tokenizer = build_tokenizer(
        [t for ex in corpus for t in (ex.question, ex.answer)], TOKENIZER_VOCAB
    )
    save_tokenizer(tokenizer, out_dir, CHAT_TEMPLATE.read_text())
    ids = special_token_ids(tokenizer)
    config = hf_config_dict(model_cfg, padded_vocab_size(tokenizer.get_vocab_size()), ids)
    write_json(out_dir / "config.json", config)
    write_json(out_dir / "preprocessor_config.json", preprocessor_config_dict(model_cfg))
    write_json(
        out_dir / "video_preprocessor_config.json", video_preprocessor_config_dict(model_cfg)
    )
    write_json(out_dir / "generation_config.json", generation_config_dict(ids))
    return tokenizer, config


def build_model(config: dict):
    """A freshly initialised transformers model for the config dict (seed torch first)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    hf_config = Qwen3VLMoeConfig(**config)
    return Qwen3VLMoeForConditionalGeneration._from_config(
        hf_config,
        attn_implementation="sdpa",
        experts_implementation="grouped_mm",
        dtype=torch.float32,
    )


def exact_by_kind(model, batch, kinds: list[str]) -> dict[str, float]:
    """Teacher-forced exact match per kind: every answer token (and <|im_end|>) is the argmax.

    With greedy decoding this equals generating the answer exactly, at the cost of one forward.
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits[:, :-1]
    model.train(was_training)
    targets = batch.labels[:, 1:]
    ok = ((logits.argmax(-1) == targets) | (targets == IGNORE_INDEX)).all(dim=1)
    return {
        k: float(ok[[i for i, kk in enumerate(kinds) if kk == k]].float().mean())
        for k in QUESTION_KINDS
        if k in kinds
    }


def train(
    model, tokenizer, image_processor, cfg: TrainConfig, aux_head: nn.Linear | None = None
) -> None:
    """Run the optimisation loop in place on `model`.

    With `aux_head` (from the vision warm-up) its per-token loss is added with weight
    cfg.aux_weight, so the tower keeps separating shapes while the language model learns.
    """
    probe = make_dataset(cfg.seed + 3, cfg.probe_size if cfg.probe_every else 0)
    probe_kinds = [e.kind for e in probe]
    probe_batch = probe and make_batch(
        tokenizer,
        image_processor,
        [e.image for e in probe],
        [e.question for e in probe],
        [e.answer for e in probe],
    )
    rng = random.Random(cfg.seed + 2)
    named = list(model.named_parameters())
    if aux_head is not None:
        named += [(f"aux_head.{n}", p) for n, p in aux_head.named_parameters()]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if p.ndim < 2 or "embed" in n]
    capture = TokenCapture(model.model.visual) if aux_head is not None else None
    patch, merge = image_processor.patch_size, image_processor.merge_size
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    start, running = time.monotonic(), 0.0
    for step in range(cfg.steps):
        max_shapes = 1 + sum(step >= frac * cfg.steps for frac in cfg.curriculum)
        firsts = rng.choices(QUESTION_KINDS, weights=cfg.first_kind_weights, k=cfg.batch_size)
        convs = [
            make_conversation(rng, rng.randint(1, cfg.max_turns), max_shapes, kind)
            for kind in firsts
        ]
        batch = make_conversation_batch(
            tokenizer,
            image_processor,
            [c[0].image for c in convs],
            [[(e.question, e.answer) for e in c] for c in convs],
        )
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        out = model(**batch.model_inputs(), labels=batch.labels, output_router_logits=True)
        loss = out.loss
        if capture is not None:
            targets = targets_for([c[0].scene for c in convs], batch.image_grid_thw, patch, merge)
            aux_loss, aux_acc, _ = token_loss(aux_head, capture.tokens, targets)
            loss = loss + cfg.aux_weight * aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += out.loss.item()  # the language loss alone, comparable across settings
        if (step + 1) % cfg.log_every == 0:
            elapsed = time.monotonic() - start
            aux = f" shape-token acc {aux_acc:.2f}" if capture is not None else ""
            print(
                f"step {step + 1}/{cfg.steps} loss {running / cfg.log_every:.4f}{aux} "
                f"lr {lr_at(step, cfg):.2e} {elapsed:.0f}s",
                flush=True,
            )
            running = 0.0
        if cfg.probe_every and (step + 1) % cfg.probe_every == 0:
            scores = exact_by_kind(model, probe_batch, probe_kinds)
            print("  probe " + " ".join(f"{k} {v:.2f}" for k, v in scores.items()), flush=True)
    if capture is not None:
        capture.remove()
    model.eval()


def save_weights(model, out_dir: Path, model_cfg: SmallModelConfig) -> None:
    """Save the weights as model.safetensors in the hub expert layout."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        # A copy (not a move) so the file gets ordinary permissions, not the temp dir's.
        shutil.copyfile(Path(tmp) / "model.safetensors", out_dir / "model.safetensors")
    rewrite_in_hub_layout(out_dir, model_cfg.hidden_size, model_cfg.moe_intermediate_size)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/shapes-vl"))
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument(
        "--vision-steps",
        type=int,
        default=WarmupConfig.steps,
        help="steps of the vision warm-up stage (0 skips it)",
    )
    args = parser.parse_args(argv)
    cfg = TrainConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model_cfg = SmallModelConfig()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer, config = write_static_files(args.out, model_cfg, cfg.seed)

    from transformers import AutoImageProcessor

    image_processor = AutoImageProcessor.from_pretrained(args.out)
    model = build_model(config)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}", flush=True)
    start = time.monotonic()
    aux_head = None
    if args.vision_steps:
        aux_head = warm_up_vision(
            model.model.visual,
            image_processor,
            WarmupConfig(seed=cfg.seed, steps=args.vision_steps),
        )
    train(model, tokenizer, image_processor, cfg, aux_head)
    print(f"training took {time.monotonic() - start:.0f}s", flush=True)
    save_weights(model, args.out, model_cfg)
    print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
