"""Synthetic shapes images with unambiguous questions, for training and testing the small model.

Each image holds one to three non-overlapping shapes (circle, square, triangle), each in one of six
colours, on a plain or noisy neutral background. Every question has exactly one right answer: a
question type is drawn first and scenes are re-drawn until the question is answerable without
ambiguity.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 165, 60),
    "blue": (40, 75, 225),
    "yellow": (240, 210, 35),
    "purple": (140, 55, 185),
    "orange": (245, 135, 25),
}
# Neutral backgrounds, far from every shape colour, so "the colour of X" never means the background.
BACKGROUNDS = ((255, 255, 255), (205, 205, 205), (235, 225, 200), (70, 70, 70), (15, 15, 15))
QUESTION_KINDS = ("color", "shape", "count", "where", "describe")
COUNT_WORDS = ("zero", "one", "two", "three")

MIN_SIDE, MAX_SIDE, MAX_ASPECT = 72, 192, 2.0
# Shape size as a fraction of the image's shorter side; the lower bound keeps a shape at least a
# few patches wide after the processor resizes the image.
MIN_SIZE_FRAC, MAX_SIZE_FRAC = 0.26, 0.42
# Gap (px) between shape bounding boxes: shapes never touch, so counting is unambiguous.
BOX_GAP = 4
# A "where" answer needs the shape's centre clearly off-centre along one axis and clearly less
# off-centre along the other (offsets as fractions of the image width / height).
WHERE_MIN_OFFSET, WHERE_MIN_MARGIN = 0.2, 0.15
# The description lists shapes left to right, so their centres must be clearly apart in x.
DESCRIBE_MIN_DX = 0.12
MAX_SCENE_TRIES = 1000

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("What color is the {shape}?", "What colour is the {shape}?"),
    "shape": ("What shape is the {color} object?", "Which shape is {color}?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?"),
    "where": ("Where is the {color} {shape}?", "Where is the {color} {shape} in the image?"),
    "describe": ("Describe the image.", "Describe this image.", "What is in the image?"),
}


class DataError(ValueError):
    """Raised for an invalid request to the generator (unknown question kind, bad size)."""


@dataclass(frozen=True)
class Shape:
    """One shape in a scene: kind, colour name, centre (px) and half-size (px)."""

    kind: str
    color: str
    cx: float
    cy: float
    half: float

    def box(self) -> tuple[float, float, float, float]:
        """Bounding box (x0, y0, x1, y1)."""
        return (self.cx - self.half, self.cy - self.half, self.cx + self.half, self.cy + self.half)


@dataclass(frozen=True)
class Scene:
    """The drawable content of an image: its size, background and shapes."""

    width: int
    height: int
    background: tuple[int, int, int]
    noisy: bool
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class Example:
    """One training or evaluation item: an image, a question about it and its one right answer."""

    image: Image.Image
    question: str
    answer: str
    kind: str
    scene: Scene


def _boxes_apart(a: Shape, b: Shape) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    apart_x = ax1 + BOX_GAP <= bx0 or bx1 + BOX_GAP <= ax0
    return apart_x or ay1 + BOX_GAP <= by0 or by1 + BOX_GAP <= ay0


def _place_shape(rng: random.Random, width: int, height: int, placed: list[Shape]) -> Shape | None:
    short = min(width, height)
    for _ in range(50):
        half = rng.uniform(MIN_SIZE_FRAC, MAX_SIZE_FRAC) * short / 2
        cx = rng.uniform(half + 1, width - half - 1)
        cy = rng.uniform(half + 1, height - half - 1)
        shape = Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), cx, cy, half)
        if all(_boxes_apart(shape, other) for other in placed):
            return shape
    return None


def random_scene(rng: random.Random, num_shapes: int | None = None) -> Scene:
    """Draw a random scene description; `num_shapes` (1-3) is random when None."""
    if num_shapes is not None and not 1 <= num_shapes <= 3:
        raise DataError(f"num_shapes must be 1, 2 or 3, got {num_shapes}")
    while True:
        width = rng.randint(MIN_SIDE, MAX_SIDE)
        low = max(MIN_SIDE, int(width / MAX_ASPECT) + 1)
        high = min(MAX_SIDE, int(width * MAX_ASPECT))
        height = rng.randint(low, high)
        count = num_shapes or rng.randint(1, 3)
        shapes: list[Shape] = []
        for _ in range(count):
            shape = _place_shape(rng, width, height, shapes)
            if shape is None:
                break
            shapes.append(shape)
        if len(shapes) == count:
            return Scene(width, height, rng.choice(BACKGROUNDS), rng.random() < 0.5, tuple(shapes))


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
    x0, y0, x1, y1 = shape.box()
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon(((shape.cx, y0), (x1, y1), (x0, y1)), fill=fill)


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """Render a scene to an RGB image (colour shades and noise drawn from `rng`)."""
    base = np.empty((scene.height, scene.width, 3), dtype=np.float32)
    base[:] = scene.background
    if scene.noisy:
        noise_rng = np.random.default_rng(rng.getrandbits(32))
        base += noise_rng.normal(0.0, 18.0, size=base.shape).astype(np.float32)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape, _jitter(rng, COLORS[shape.color], 15))
    return image


def render_mask(scene: Scene) -> Image.Image:
    """An "L" image: 0 on background, i + 1 on the pixels of scene.shapes[i]."""
    mask = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(mask)
    for i, shape in enumerate(scene.shapes):
        _draw_shape(draw, shape, i + 1)
    return mask


def where_of(shape: Shape, width: int, height: int) -> str | None:
    """left / right / top / bottom if the shape is clearly off-centre along one axis, else None."""
    dx = shape.cx / width - 0.5
    dy = shape.cy / height - 0.5
    major, minor = (abs(dx), abs(dy)) if abs(dx) >= abs(dy) else (abs(dy), abs(dx))
    if major < WHERE_MIN_OFFSET or major - minor < WHERE_MIN_MARGIN:
        return None
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(shapes: tuple[Shape, ...]) -> str:
    """One sentence naming every shape, left to right: 'A red circle and a blue square.'."""
    names = [f"{_article(s.color)} {s.color} {s.kind}" for s in sorted(shapes, key=lambda s: s.cx)]
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return text[0].upper() + text[1:] + "."


def _unique(shapes: tuple[Shape, ...], attr: str) -> list[Shape]:
    values = [getattr(s, attr) for s in shapes]
    return [s for s in shapes if values.count(getattr(s, attr)) == 1]


def question_for(kind: str, scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    """A (question, answer) of this kind with one right answer for the scene, or None if none."""
    template = rng.choice(QUESTION_TEMPLATES[kind])
    shapes = scene.shapes
    if kind == "count":
        return template, COUNT_WORDS[len(shapes)]
    if kind == "describe":
        xs = sorted(s.cx / scene.width for s in shapes)
        if any(b - a < DESCRIBE_MIN_DX for a, b in zip(xs, xs[1:], strict=False)):
            return None
        return template, describe(shapes)
    if kind == "color":
        candidates = _unique(shapes, "kind")
        if not candidates:
            return None
        target = rng.choice(candidates)
        return template.format(shape=target.kind), target.color
    if kind == "shape":
        candidates = _unique(shapes, "color")
        if not candidates:
            return None
        target = rng.choice(candidates)
        return template.format(color=target.color), target.kind
    candidates = [
        s
        for s in shapes
        if sum(o.kind == s.kind and o.color == s.color for o in shapes) == 1
        and where_of(s, scene.width, scene.height) is not None
    ]
    if not candidates:
        return None
    target = rng.choice(candidates)
    answer = where_of(target, scene.width, scene.height)
    return template.format(color=target.color, shape=target.kind), answer  # type: ignore


def _check_max_shapes(max_shapes: int) -> None:
    if not 1 <= max_shapes <= 3:
        raise DataError(f"max_shapes must be 1, 2 or 3, got {max_shapes}")


def make_example(rng: random.Random, kind: str | None = None, max_shapes: int = 3) -> Example:
    """One example; `kind` is one of QUESTION_KINDS (random when None)."""
    if kind is None:
        kind = rng.choice(QUESTION_KINDS)
    if kind not in QUESTION_KINDS:
        raise DataError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")
    _check_max_shapes(max_shapes)
    for _ in range(MAX_SCENE_TRIES):
        scene = random_scene(rng, rng.randint(1, max_shapes))
        qa = question_for(kind, scene, rng)
        if qa is not None:
            return Example(render(scene, rng), qa[0], qa[1], kind, scene)
    raise DataError(f"no answerable {kind!r} scene in {MAX_SCENE_TRIES} tries")


def make_conversation(
    rng: random.Random, num_turns: int, max_shapes: int = 3, first_kind: str | None = None
) -> list[Example]:
    """Up to `num_turns` questions of distinct kinds about one scene (they share the image).

    The first question is of `first_kind` (random when None), so callers control the mix of
    first questions; later ones are of the other kinds the scene can answer, in random order.
    """
    if num_turns < 1:
        raise DataError(f"num_turns must be >= 1, got {num_turns}")
    first = make_example(rng, first_kind, max_shapes)
    others = [k for k in rng.sample(QUESTION_KINDS, len(QUESTION_KINDS)) if k != first.kind]
    qas = [(k, qa) for k in others if (qa := question_for(k, first.scene, rng)) is not None]
    later = [Example(first.image, q, a, k, first.scene) for k, (q, a) in qas[: num_turns - 1]]
    return [first, *later]


def make_dataset(seed: int, n: int) -> list[Example]:
    """`n` examples, deterministic for `seed`, question kinds cycling so each is equally common."""
    if n < 0:
        raise DataError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    return [make_example(rng, QUESTION_KINDS[i % len(QUESTION_KINDS)]) for i in range(n)]
