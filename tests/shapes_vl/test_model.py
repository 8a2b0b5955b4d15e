"""The shipped small model answers held-out questions, in transformers and in shared.model."""

from __future__ import annotations

import pytest

from scripts.shapes_vl.data import make_dataset
from scripts.shapes_vl.evaluate import HELD_OUT_SEED, hf_answerer, score, shared_answerer
from tests.shapes_vl.conftest import SHIPPED

NUM_QUESTIONS = 10


@pytest.fixture(scope="module")
def held_out():
    return make_dataset(HELD_OUT_SEED, NUM_QUESTIONS)


@pytest.fixture(scope="module")
def hf_answers(shipped_hf_model, held_out) -> list[str]:
    answer = hf_answerer(SHIPPED, shipped_hf_model)
    return [answer(ex.image, ex.question) for ex in held_out]


def test_transformers_answers_held_out_questions(hf_answers, held_out):
    correct = sum(got == ex.answer for got, ex in zip(hf_answers, held_out, strict=True))
    assert correct >= NUM_QUESTIONS - 1, (hf_answers, [ex.answer for ex in held_out])


def test_shared_model_answers_like_transformers(hf_answers, held_out):
    answer = shared_answerer(SHIPPED)
    assert [answer(ex.image, ex.question) for ex in held_out] == hf_answers


def test_answers_need_the_image(held_out):
    # Without image embeddings the model can only guess from the question.
    blind = score(shared_answerer(SHIPPED, "no_image"), held_out)
    assert blind.accuracy < 0.8


NUM_CLIPS = 9


@pytest.fixture(scope="module")
def held_out_clips():
    from scripts.shapes_vl.video_data import make_video_dataset
    from scripts.shapes_vl.video_eval import HELD_OUT_VIDEO_SEED

    return make_video_dataset(HELD_OUT_VIDEO_SEED, NUM_CLIPS)


@pytest.fixture(scope="module")
def hf_clip_answers(shipped_hf_model, held_out_clips) -> list[str]:
    from scripts.shapes_vl.video_eval import hf_video_answerer

    answer = hf_video_answerer(SHIPPED, shipped_hf_model)
    return [answer(ex.data, ex.question) for ex in held_out_clips]


def test_transformers_answers_held_out_clips(hf_clip_answers, held_out_clips):
    correct = sum(got == ex.answer for got, ex in zip(hf_clip_answers, held_out_clips, strict=True))
    assert correct >= NUM_CLIPS - 2, (hf_clip_answers, [ex.answer for ex in held_out_clips])


def test_shared_model_answers_clips_like_transformers(hf_clip_answers, held_out_clips):
    from scripts.shapes_vl.video_eval import shared_video_answerer

    answer = shared_video_answerer(SHIPPED)
    assert [answer(ex.data, ex.question) for ex in held_out_clips] == hf_clip_answers


def test_clip_answers_need_the_clip(held_out_clips):
    from scripts.shapes_vl.video_eval import shared_video_answerer

    blind = score(shared_video_answerer(SHIPPED, "no_image"), held_out_clips)
    assert blind.accuracy < 0.7
