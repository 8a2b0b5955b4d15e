"""Held-out exact-match accuracy of the small shapes model, per question kind, on images and clips.

    .venv/bin/python -m scripts.shapes_vl.evaluate --model models/shapes-vl -n 200 --videos 100
    .venv/bin/python -m scripts.shapes_vl.evaluate --backend shared -n 200 --videos 100

`--backend hf` runs transformers' Qwen3VLMoeForConditionalGeneration; `--backend shared` runs the
project's own `shared.model` vision tower and language model (as the two services do) three times:
as is, with the deepstack embeddings zeroed, and with the image embeddings zeroed. Answers are
greedy, stopped at <|im_end|>, and must match exactly. Clips (`--videos`, held-out seed
`video_eval.HELD_OUT_VIDEO_SEED`) are mp4 bytes decoded and sampled as the encode service does,
in prompts as transformers' processor renders a video (`video_eval`).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer

from scripts.shapes_vl.answers import ablate, decode_answer, hf_greedy, shared_greedy
from scripts.shapes_vl.data import QUESTION_KINDS, Example, make_dataset
from scripts.shapes_vl.prompts import SpecialIds, make_batch, prompt_ids
from scripts.shapes_vl.video_data import VIDEO_KINDS, make_video_dataset
from scripts.shapes_vl.video_eval import (
    HELD_OUT_VIDEO_SEED,
    hf_video_answerer,
    shared_video_answerer,
)

# Never used for training: train.py draws from --seed + 1 .. --seed + 4 (default seed 0).
HELD_OUT_SEED = 20_251_126
SHARED_MODES = ("full", "no_deepstack", "no_image")

Answerer = Callable[[Image.Image, str], str]


@dataclass(frozen=True)
class Report:
    """Exact-match counts per question kind."""

    correct: dict[str, int]
    total: dict[str, int]

    @property
    def accuracy(self) -> float:
        """Overall fraction of exact answers."""
        return sum(self.correct.values()) / max(1, sum(self.total.values()))

    def lines(self) -> list[str]:
        """Human-readable per-kind and overall accuracy."""
        out = [
            f"  {kind:11s} {self.correct.get(kind, 0):4d}/{self.total[kind]:4d} "
            f"{self.correct.get(kind, 0) / max(1, self.total[kind]):.3f}"
            for kind in dict.fromkeys((*QUESTION_KINDS, *VIDEO_KINDS))
            if self.total.get(kind)
        ]
        out.append(
            f"  {'overall':11s} {sum(self.correct.values()):4d}/"
            f"{sum(self.total.values()):4d} {self.accuracy:.3f}"
        )
        return out


def score(answer: Callable, examples: Sequence, verbose: bool = False) -> Report:
    """Ask every example's question (about its image, or its clip's bytes) and count exact
    answers per kind."""
    correct: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for ex in examples:
        got = answer(ex.image if isinstance(ex, Example) else ex.data, ex.question)
        total[ex.kind] += 1
        correct[ex.kind] += got == ex.answer
        if verbose and got != ex.answer:
            print(f"  miss [{ex.kind}] {ex.question!r}: got {got!r}, want {ex.answer!r}")
    return Report(dict(correct), dict(total))


def hf_answerer(model_dir: Path, model=None) -> Answerer:
    """Greedy answers from transformers' model (loaded from `model_dir` unless given)."""
    from transformers import AutoImageProcessor, Qwen3VLMoeForConditionalGeneration

    if model is None:
        model = Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    sp = SpecialIds.from_tokenizer(tokenizer)

    def answer(image: Image.Image, question: str) -> str:
        batch = make_batch(tokenizer, image_processor, [image], [question])
        return hf_greedy(model, batch, tokenizer, sp)

    return answer


def shared_answerer(model_dir: Path, mode: str = "full") -> Answerer:
    """Greedy answers from `shared.model`'s vision tower + language model (no KV cache).

    `mode` "no_deepstack" zeroes the deepstack embeddings, "no_image" the image embeddings.
    """
    from shared.model.config import load_config
    from shared.model.loader import load_text_model, load_vision_model
    from shared.model.processing import (
        load_image_processor_config,
        num_image_tokens,
        preprocess_image,
    )
    from shared.model.qwen3_vl_moe import separate_deepstack_embeds

    if mode not in SHARED_MODES:
        raise ValueError(f"mode must be one of {SHARED_MODES}, got {mode!r}")
    config = load_config(model_dir)
    vision = load_vision_model(model_dir).eval()
    language = load_text_model(model_dir).eval()
    proc_cfg = load_image_processor_config(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    sp = SpecialIds.from_tokenizer(tokenizer)

    @torch.no_grad()
    def answer(image: Image.Image, question: str) -> str:
        pixel_values, grid = preprocess_image(image, proc_cfg)
        packed = vision(pixel_values, torch.tensor([grid]))
        embeds, deepstack = ablate(*separate_deepstack_embeds(packed, config.num_deepstack), mode)
        ids = prompt_ids(tokenizer, question, num_image_tokens(grid, proc_cfg.merge_size))
        new = shared_greedy(
            language,
            ids,
            embeds,
            deepstack,
            [grid],
            config.image_token_id,
            proc_cfg.merge_size,
            sp.im_end,
        )
        return decode_answer(tokenizer, new, sp.im_end)

    return answer


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/shapes-vl"))
    parser.add_argument("-n", type=int, default=200, help="number of held-out questions")
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--videos", type=int, default=100, help="number of held-out clips")
    parser.add_argument("--video-seed", type=int, default=HELD_OUT_VIDEO_SEED)
    parser.add_argument("--backend", choices=("hf", "shared"), default="hf")
    parser.add_argument("--verbose", action="store_true", help="print every wrong answer")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    examples = make_dataset(args.seed, args.n)
    clips = make_video_dataset(args.video_seed, args.videos)
    if args.backend == "hf":
        runs = {"hf": (hf_answerer(args.model), hf_video_answerer(args.model))}
    else:
        runs = {
            f"shared/{mode}": (
                shared_answerer(args.model, mode),
                shared_video_answerer(args.model, mode),
            )
            for mode in SHARED_MODES
        }
    for name, (answerer, video_answerer) in runs.items():
        for what, items, ask in (("images", examples, answerer), ("videos", clips, video_answerer)):
            if not items:
                continue
            report = score(ask, items, verbose=args.verbose)
            print(f"{name}: {report.accuracy:.3f} exact on {len(items)} held-out {what}")
            print("\n".join(report.lines()), flush=True)


if __name__ == "__main__":
    main()
