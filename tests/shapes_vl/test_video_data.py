"""The synthetic clips: deterministic, varied, every answer visible in the sampled frames, and the
training prompt of a clip equal to transformers' Qwen3-VL processor's."""

from __future__ import annotations

import json
import random
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from scripts.shapes_vl.data import COLORS, COUNT_WORDS, SHAPES, DataError
from scripts.shapes_vl.modelcfg import SmallModelConfig, video_preprocessor_config_dict
from scripts.shapes_vl.video_data import (
    VIDEO_KINDS,
    VideoExample,
    make_video_conversation,
    make_video_dataset,
    pure_groups,
    random_clip,
    render_clip,
    video_processor_config,
    video_question_for,
)
from scripts.shapes_vl.video_eval import sample
from scripts.shapes_vl.video_prompts import make_mixed_batch, video_prompt_ids
from shared.model.video import load_video_processor_config
from shared.model.video_decode import decode_frames, probe
from tests.model.test_video import run_oracle
from tests.shapes_vl.conftest import SHIPPED


@pytest.fixture(scope="module")
def clips() -> list[VideoExample]:
    return make_video_dataset(seed=11, n=60)


def test_shipped_video_config_is_the_generators():
    written = json.loads((SHIPPED / "video_preprocessor_config.json").read_text())
    assert written == json.loads(json.dumps(video_preprocessor_config_dict(SmallModelConfig())))
    assert written["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert load_video_processor_config(SHIPPED) == video_processor_config()


def test_same_seed_same_clips():
    a, b = make_video_dataset(3, 6), make_video_dataset(3, 6)
    for x, y in zip(a, b, strict=True):
        assert (x.data, x.question, x.answer, x.kind, x.clip) == (
            y.data,
            y.question,
            y.answer,
            y.kind,
            y.clip,
        )
    assert [x.data for x in make_video_dataset(4, 6)] != [x.data for x in a]


def test_kinds_cycle_and_answers_vary(clips):
    assert [c.kind for c in clips[:6]] == [*VIDEO_KINDS, *VIDEO_KINDS]
    answers = {k: Counter(c.answer for c in clips if c.kind == k) for k in VIDEO_KINDS}
    assert set(answers["count"]) == set(COUNT_WORDS[1:])
    assert set(answers["last_shape"]) == set(SHAPES)
    assert len(answers["first_color"]) >= 5 and set(answers["first_color"]) <= set(COLORS)


def test_clips_show_each_shape_in_a_whole_temporal_group():
    cfg = video_processor_config()
    rng = random.Random(5)
    for _ in range(200):
        clip = random_clip(rng)
        groups = pure_groups(clip, cfg)
        assert set(groups) - {None} == set(range(len(clip.segments)))
        assert 2 <= len(groups) <= 6
        assert len({s.shape.color for s in clip.segments}) == len(clip.segments)
        assert clip.segments[0].start == 0 and clip.segments[-1].end == clip.num_frames
        assert all(a.end == b.start for a, b in zip(clip.segments, clip.segments[1:], strict=False))
        assert groups[0] == 0 and groups[-1] == len(clip.segments) - 1


def test_decoded_clips_keep_the_shapes_colours(clips):
    """Through h264 and back, each segment's frames hold its shape's colour."""
    for ex in clips[:12]:
        clip = ex.clip
        frames, meta = decode_frames(ex.data, range(clip.num_frames))
        assert (meta.num_frames, meta.width, meta.height) == (
            clip.num_frames,
            clip.width,
            clip.height,
        )
        for seg in clip.segments:
            x, y = int(seg.shape.cx), int(seg.shape.cy + seg.shape.half / 2)
            got = frames[(seg.start + seg.end) // 2, y, x].astype(int)
            assert np.abs(got - COLORS[seg.shape.color]).max() < 45, (seg, got)


def test_questions_have_their_answers(clips):
    rng = random.Random(0)
    clip = clips[0].clip
    assert video_question_for("first_color", clip, rng)[1] == clip.segments[0].shape.color
    assert video_question_for("count", clip, rng)[1] == COUNT_WORDS[len(clip.segments)]
    assert video_question_for("last_shape", clip, rng)[1] == clip.segments[-1].shape.kind
    with pytest.raises(DataError):
        video_question_for("where", clip, rng)
    turns = make_video_conversation(random.Random(1), 3)
    assert sorted(t.kind for t in turns) == sorted(VIDEO_KINDS)
    assert len({t.data for t in turns}) == 1
    with pytest.raises(DataError):
        random_clip(random.Random(0), 4)


def test_render_is_deterministic():
    clip = random_clip(random.Random(2), 2)
    a, b = render_clip(clip, random.Random(9)), render_clip(clip, random.Random(9))
    assert a.shape == (clip.num_frames, clip.height, clip.width, 3) and np.array_equal(a, b)


def test_training_prompt_and_pixels_equal_transformers(clips):
    """transformers' processor (with the shipped video config and chat template) on the decoded
    clip gives the pixels, grid and prompt ids training and evaluation use."""
    tokenizer = Tokenizer.from_file(str(SHIPPED / "tokenizer.json"))
    picks = clips[:3]
    with tempfile.TemporaryDirectory() as tmp:
        tmp, cases = Path(tmp), []
        for i, ex in enumerate(picks):
            meta = probe(ex.data)
            frames, _ = decode_frames(ex.data, range(meta.num_frames))
            np.save(tmp / f"clip{i}.npy", frames)
            content = [{"type": "video"}, {"type": "text", "text": ex.question}]
            cases.append(
                {
                    "frames": str(tmp / f"clip{i}.npy"),
                    "video_fps": meta.fps,
                    "kwargs": {},
                    "prompt": {
                        "model_dir": str(SHIPPED),
                        "messages": [{"role": "user", "content": content}],
                    },
                }
            )
        run_oracle(cases, tmp)
        for i, ex in enumerate(picks):
            video = sample(SHIPPED, ex.data)
            _, h, w = video.grid_thw
            want_ids = np.load(tmp / f"{i}_ids.npy").tolist()
            assert video_prompt_ids(tokenizer, ex.question, video.timestamps, h * w // 4) == (
                want_ids
            )
            assert np.load(tmp / f"{i}_grid.npy").tolist() == [list(video.grid_thw)]
            pixels = np.load(tmp / f"{i}_pixels.npy")
            assert np.abs(pixels - video.pixel_values.numpy()).max() < 1e-5


def test_mixed_batch_marks_image_and_video_pads(clips):
    from transformers import AutoImageProcessor

    from scripts.shapes_vl.data import make_dataset

    tokenizer = Tokenizer.from_file(str(SHIPPED / "tokenizer.json"))
    image = make_dataset(0, 1)[0]
    video = sample(SHIPPED, clips[0].data)
    batch = make_mixed_batch(
        tokenizer,
        AutoImageProcessor.from_pretrained(SHIPPED),
        [(image.image, [(image.question, image.answer)])],
        [(video, [(clips[0].question, clips[0].answer), ("How many shapes appear?", "two")])],
    )
    t, h, w = video.grid_thw
    types = batch.mm_token_type_ids
    assert int((types[1] == 2).sum()) == t * h * w // 4 and int((types[1] == 1).sum()) == 0
    assert int((types[0] == 1).sum()) == int(batch.image_grid_thw[0].prod()) // 4
    assert batch.video_grid_thw.tolist() == [list(video.grid_thw)]
    answers = batch.labels[1][batch.labels[1] != -100].tolist()
    assert tokenizer.decode(answers, skip_special_tokens=False) == (
        f"{clips[0].answer}<|im_end|>two<|im_end|>"
    )
