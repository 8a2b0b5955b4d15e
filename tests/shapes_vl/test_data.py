"""The synthetic shapes generator: determinism, variety, and one right answer per question."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from scripts.shapes_vl.data import (
    COLORS,
    COUNT_WORDS,
    DESCRIBE_MIN_DX,
    QUESTION_KINDS,
    SHAPES,
    DataError,
    Example,
    describe,
    make_conversation,
    make_dataset,
    make_example,
    random_scene,
    where_of,
)


@pytest.fixture(scope="module")
def dataset() -> list[Example]:
    return make_dataset(seed=7, n=300)


def test_same_seed_same_examples():
    a, b = make_dataset(3, 25), make_dataset(3, 25)
    for x, y in zip(a, b, strict=True):
        assert (x.question, x.answer, x.kind, x.scene) == (y.question, y.answer, y.kind, y.scene)
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))


def test_different_seed_different_examples():
    a, b = make_dataset(3, 25), make_dataset(4, 25)
    assert [x.scene for x in a] != [y.scene for y in b]


def test_variety(dataset):
    kinds = Counter(ex.kind for ex in dataset)
    assert set(kinds) == set(QUESTION_KINDS) and min(kinds.values()) == len(dataset) // 5
    shapes = [s for ex in dataset for s in ex.scene.shapes]
    assert {s.kind for s in shapes} == set(SHAPES)
    assert {s.color for s in shapes} == set(COLORS)
    assert {len(ex.scene.shapes) for ex in dataset} == {1, 2, 3}
    sizes = {ex.image.size for ex in dataset}
    assert len(sizes) > 100
    assert sum(w != h for w, h in sizes) > 0.8 * len(sizes)
    assert {ex.scene.noisy for ex in dataset} == {True, False}


def test_shapes_inside_and_apart(dataset):
    for ex in dataset:
        scene = ex.scene
        assert ex.image.size == (scene.width, scene.height)
        for i, s in enumerate(scene.shapes):
            x0, y0, x1, y1 = s.box()
            assert 0 <= x0 and x1 <= scene.width and 0 <= y0 and y1 <= scene.height
            for other in scene.shapes[i + 1 :]:
                ox0, oy0, ox1, oy1 = other.box()
                assert x1 < ox0 or ox1 < x0 or y1 < oy0 or oy1 < y0


def test_shape_drawn_in_its_colour(dataset):
    for ex in dataset[:60]:
        pixels = np.asarray(ex.image).astype(int)
        for s in ex.scene.shapes:
            centre = pixels[int(s.cy), int(s.cx)]
            assert np.abs(centre - np.array(COLORS[s.color])).max() <= 15


def _check_answer(ex: Example) -> None:
    shapes, scene = ex.scene.shapes, ex.scene
    if ex.kind == "count":
        assert ex.answer == COUNT_WORDS[len(shapes)]
    elif ex.kind == "color":
        kind = next(k for k in SHAPES if k in ex.question)
        matches = [s for s in shapes if s.kind == kind]
        assert len(matches) == 1 and matches[0].color == ex.answer
    elif ex.kind == "shape":
        color = next(c for c in COLORS if c in ex.question)
        matches = [s for s in shapes if s.color == color]
        assert len(matches) == 1 and matches[0].kind == ex.answer
    elif ex.kind == "where":
        color = next(c for c in COLORS if c in ex.question)
        kind = next(k for k in SHAPES if k in ex.question)
        matches = [s for s in shapes if s.color == color and s.kind == kind]
        assert len(matches) == 1
        assert where_of(matches[0], scene.width, scene.height) == ex.answer
    else:
        xs = sorted(s.cx / scene.width for s in shapes)
        assert all(b - a >= DESCRIBE_MIN_DX for a, b in zip(xs, xs[1:], strict=False))
        assert ex.answer == describe(shapes)


def test_every_answer_is_the_only_right_one(dataset):
    for ex in dataset:
        _check_answer(ex)


def test_describe_lists_left_to_right_with_articles():
    rng = random.Random(0)
    ex = make_example(rng, "describe")
    while len(ex.scene.shapes) < 3:
        ex = make_example(rng, "describe")
    ordered = sorted(ex.scene.shapes, key=lambda s: s.cx)
    parts = [f"{s.color} {s.kind}" for s in ordered]
    assert ex.answer.endswith(".") and ex.answer[0].isupper()
    positions = [ex.answer.index(p) for p in parts]
    assert positions == sorted(positions)
    assert ("an orange" in ex.answer.lower()) == any(s.color == "orange" for s in ordered)
    assert "a orange" not in ex.answer.lower()


def test_where_needs_a_clear_side():
    scene = random_scene(random.Random(1), num_shapes=1)
    shape = scene.shapes[0]
    centred = type(shape)(shape.kind, shape.color, scene.width / 2, scene.height / 2, shape.half)
    assert where_of(centred, scene.width, scene.height) is None
    left = type(shape)(shape.kind, shape.color, scene.width * 0.2, scene.height / 2, shape.half)
    assert where_of(left, scene.width, scene.height) == "left"


def test_conversation_asks_distinct_kinds_about_one_scene():
    rng = random.Random(2)
    for _ in range(30):
        conv = make_conversation(rng, num_turns=3, max_shapes=1)
        assert 1 <= len(conv) <= 3
        assert len({ex.kind for ex in conv}) == len(conv)
        assert all(ex.scene == conv[0].scene and ex.image is conv[0].image for ex in conv)
        assert len(conv[0].scene.shapes) == 1
        for ex in conv:
            _check_answer(ex)
    for kind in QUESTION_KINDS:
        assert make_conversation(rng, num_turns=2, first_kind=kind)[0].kind == kind


def test_bad_requests_raise_typed_errors():
    with pytest.raises(DataError, match="unknown question kind"):
        make_example(random.Random(0), "size")
    with pytest.raises(DataError, match="num_shapes"):
        random_scene(random.Random(0), num_shapes=4)
    with pytest.raises(DataError, match="max_shapes"):
        make_conversation(random.Random(0), num_turns=2, max_shapes=0)
    with pytest.raises(DataError, match="n must be"):
        make_dataset(0, -1)
