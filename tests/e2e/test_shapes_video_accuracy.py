"""The trained shapes model answers questions about clips through the split path.

Held-out clips (h264 mp4, `scripts/shapes_vl/video_data.py`) go as `video_url` data URLs over
HTTP -> language -> encode (real processes, embeddings inline in gRPC): the encode service
decodes and samples each clip per the checkpoint's `video_preprocessor_config.json` and runs
each temporal group through the vision tower, the language service builds the prompt (group
times and pads) and generates. The answers must be >= 80% exact, the served prompt must be the
one the model was trained on, and each answer must be `shared.model`'s greedy answer in this
process (one teacher-forced forward per clip).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from scripts.shapes_vl.chat import video_messages
from scripts.shapes_vl.video_data import VIDEO_KINDS, VideoExample, make_video_dataset
from scripts.shapes_vl.video_eval import HELD_OUT_VIDEO_SEED, sample
from scripts.shapes_vl.video_prompts import video_prompt_ids
from shared.model.config import load_config
from shared.model.loader import load_text_model, load_vision_model
from shared.model.processing import mrope_positions
from shared.model.qwen3_vl_moe import separate_deepstack_embeds, splice_image_embeds
from tests.e2e.test_shapes_accuracy import Served, answer_all, one_thread

NUM_CLIPS = 30
MIN_ACCURACY = 0.8

__all__ = ["one_thread"]  # the fixture, imported for the in-process check


@pytest.fixture(scope="module")
def held_out_clips(e2e_model) -> list[VideoExample]:
    if not e2e_model.trained:
        pytest.fail(
            "models/shapes-vl (the trained checkpoint) is missing: these checks need its "
            "answers; train it with scripts/shapes_vl/train.py and train_video.py"
        )
    return make_video_dataset(HELD_OUT_VIDEO_SEED, NUM_CLIPS)


@pytest.fixture(scope="module")
def served(grpc_cluster, held_out_clips) -> list[Served]:
    conversations = [video_messages(ex.data, ex.question) for ex in held_out_clips]
    return asyncio.run(answer_all(grpc_cluster, conversations))


def test_split_path_answers_held_out_clips(served, held_out_clips):
    misses = [
        f"[{ex.kind}] {ex.question!r}: got {got.text!r}, want {ex.answer!r}"
        for got, ex in zip(served, held_out_clips, strict=True)
        if got.text != ex.answer
    ]
    accuracy = 1 - len(misses) / len(held_out_clips)
    assert accuracy >= MIN_ACCURACY, f"{accuracy:.3f} exact; misses:\n" + "\n".join(misses)
    for kind in VIDEO_KINDS:  # no kind left to chance
        asked = [
            (got, ex) for got, ex in zip(served, held_out_clips, strict=True) if ex.kind == kind
        ]
        right = sum(got.text == ex.answer for got, ex in asked)
        assert right >= 0.6 * len(asked), f"{kind}: {right}/{len(asked)}"


class InProcessVideoModel:
    """`shared.model`'s vision tower and language model in this process."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.config = load_config(model_dir)
        self.vision = load_vision_model(model_dir).eval()
        self.language = load_text_model(model_dir).eval()
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    @torch.no_grad()
    def check(self, example: VideoExample, got: Served) -> list[str]:
        """Differences between the served answer and this model's greedy one (empty: none)."""
        video = sample(self.model_dir, example.data)
        t, h, w = video.grid_thw
        merge = self.config.vision.spatial_merge_size
        expected = video_prompt_ids(
            self.tokenizer, example.question, video.timestamps, h * w // merge**2
        )
        if got.prompt_ids != expected:
            return [f"{example.question!r}: served prompt differs from the training format"]
        embeds, deepstack = separate_deepstack_embeds(
            self.vision(video.pixel_values, torch.tensor([video.grid_thw])),
            self.config.num_deepstack,
        )
        ids = torch.tensor(got.prompt_ids + got.token_ids[:-1])
        pad = self.config.video_token_id
        inputs_embeds, full_deepstack = splice_image_embeds(
            ids, self.language.embed_tokens(ids), embeds, deepstack, pad
        )
        positions, _ = mrope_positions(ids, [(1, h, w)] * t, pad, merge)
        logits = self.language(
            positions=positions,
            inputs_embeds=inputs_embeds,
            input_deepstack_embeds=full_deepstack,
            logits_indices=torch.arange(len(got.prompt_ids) - 1, len(ids)),
        )
        greedy = logits.argmax(-1).tolist()
        if greedy == got.token_ids:
            return []
        return [f"{example.question!r}: served {got.token_ids}, in-process greedy {greedy}"]


def test_in_process_model_gives_the_same_answers(e2e_model, held_out_clips, served, one_thread):
    model = InProcessVideoModel(e2e_model.path)
    problems = [
        p for ex, got in zip(held_out_clips, served, strict=True) for p in model.check(ex, got)
    ]
    assert not problems, "\n".join(problems)
