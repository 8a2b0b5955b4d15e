"""Request sets for the load generator: random text, random text + noise images, JSONL files.

Every set is built up front from the seed, so two runs with the same arguments send the same
bytes; building happens before the clock starts and never counts against the server.
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# About one token each for the large BPE vocabularies of real models (Qwen's 151k); with
# `--tokenizer` the text is trimmed to the exact count instead.
WORDS = tuple(
    """the of and to in is was for on are with as be at by this had not but from or have an they
    which one you were her all she there would their we him been has when who will more no if out
    so said what up its about into than them can only other new some could time these two may
    then do first any my now such like our over man me even most made after also did many before
    must through back years where much your way well down should because each just those people
    how too little state good very make world still own see men work long get here between both
    life being under never day same another know while last might us great old year off come
    since against go came right used take three small large city water house river image colour
    shape circle square red green blue yellow black white light dark left right top bottom edge
    line point number answer question picture window table chair paper stone glass metal wood
    field road tree flower bird horse train music story letter school market""".split()
)


class DatasetError(ValueError):
    """A dataset that cannot be built from the given arguments or file."""


@dataclass(frozen=True)
class BenchRequest:
    """One request to send: chat messages or a completion prompt, and its length budget."""

    max_tokens: int | None
    messages: list[dict] | None = None
    prompt: str | None = None
    num_images: int = 0  # images, or video clips
    prompt_len_estimate: int = 0  # words, or tokens with --tokenizer; the server's count wins
    image_keys: tuple[int, ...] = field(default=())  # which distinct images it carries


@dataclass(frozen=True)
class ImageBuckets:
    """Image sizes (width, height) and how often each is drawn."""

    sizes: tuple[tuple[int, int], ...]
    weights: tuple[float, ...]


def parse_buckets(text: str) -> ImageBuckets:
    """'64x64:0.5,96x64:0.5' -> ImageBuckets; the weights need not sum to 1."""
    sizes, weights = [], []
    for item in filter(None, (part.strip() for part in text.split(","))):
        size, _, weight = item.partition(":")
        width, sep, height = size.lower().partition("x")
        try:
            w, h, p = int(width), int(height), float(weight or 1.0)
        except ValueError:
            w = h = 0
            p = -1.0
        if not sep or w <= 0 or h <= 0 or p < 0:
            raise DatasetError(f"bad image bucket {item!r}; use WxH:weight, e.g. 64x64:0.5")
        sizes.append((w, h))
        weights.append(p)
    if not sizes or sum(weights) <= 0:
        raise DatasetError(f"no image bucket with a positive weight in {text!r}")
    return ImageBuckets(tuple(sizes), tuple(weights))


def parse_count_range(text: str) -> tuple[int, int]:
    """'2' -> (2, 2); '1-3' -> (1, 3): inclusive bounds of a per-request count."""
    low, sep, high = text.strip().partition("-")
    try:
        bounds = (int(low), int(high) if sep else int(low))
    except ValueError:
        raise DatasetError(f"bad count {text!r}; use N or MIN-MAX, e.g. 1 or 1-3") from None
    if bounds[0] < 0 or bounds[1] < bounds[0]:
        raise DatasetError(f"bad count {text!r}; need 0 <= MIN <= MAX")
    return bounds


def sample_lens(rng: np.random.Generator, mean_len: int, range_ratio: float, n: int) -> list[int]:
    """Lengths uniform in [mean*(1-r), mean*(1+r)], at least 1, as vLLM's random dataset draws."""
    low = max(1, int(mean_len * (1 - range_ratio)))
    high = max(low, int(mean_len * (1 + range_ratio)))
    return [int(x) for x in rng.integers(low, high + 1, size=n)]


class TextMaker:
    """Random word strings of about `n` tokens; exact when a tokenizer file is given."""

    def __init__(self, rng: np.random.Generator, tokenizer_path: str | None = None) -> None:
        self._rng = rng
        self._tokenizer = _load_tokenizer(tokenizer_path) if tokenizer_path else None

    def make(self, num_tokens: int) -> str:
        if self._tokenizer is None:
            return " ".join(self._rng.choice(WORDS, size=num_tokens))
        # Oversample words, then cut the token ids: whole words can be several tokens each
        text = " ".join(self._rng.choice(WORDS, size=num_tokens * 2 + 8))
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        while len(ids) < num_tokens:
            text += " " + text
            ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return self._tokenizer.decode(ids[:num_tokens])


def _load_tokenizer(path: str):
    from tokenizers import Tokenizer

    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise DatasetError(f"no tokenizer.json at {path}")
    return Tokenizer.from_file(str(file))


def noise_png(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A random-noise RGB PNG: incompressible, so its size is what a real photo's would be."""
    from PIL import Image

    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@dataclass(frozen=True)
class RandomSpec:
    """Arguments of the `random` and `random-mm` sets."""

    num_requests: int
    input_len: int
    output_len: int
    range_ratio: float = 0.0
    num_images: tuple[int, int] = (0, 0)
    buckets: ImageBuckets | None = None
    image_repeat_ratio: float = 0.0
    chat: bool = True
    tokenizer: str | None = None
    video: object | None = None  # videos.VideoSpec: one generated clip per request


def random_requests(spec: RandomSpec, seed: int) -> list[BenchRequest]:
    """Random word prompts, each with 0..k noise images when `spec.buckets` is set, or one
    generated clip with `spec.video`."""
    rng = np.random.default_rng(seed)
    if spec.video is not None:
        return _video_requests(spec, rng)
    text = TextMaker(rng, spec.tokenizer)
    input_lens = sample_lens(rng, spec.input_len, spec.range_ratio, spec.num_requests)
    output_lens = sample_lens(rng, spec.output_len, spec.range_ratio, spec.num_requests)
    images = _ImagePool(rng, spec.buckets) if spec.buckets else None
    repeats = _repeat_flags(rng, spec.num_requests, spec.image_repeat_ratio)
    requests = []
    for i in range(spec.num_requests):
        prompt = text.make(input_lens[i])
        keys: tuple[int, ...] = ()
        if images is not None:
            count = int(rng.integers(spec.num_images[0], spec.num_images[1] + 1))
            keys = images.draw(count, reuse=repeats[i])
        if spec.chat:
            # Plain string content without images: the form every server accepts
            content: str | list = prompt
            if images is not None:
                content = [image_part(images.url(k)) for k in keys]
                content.append({"type": "text", "text": prompt})
            messages = [{"role": "user", "content": content}]
            request = BenchRequest(
                output_lens[i],
                messages=messages,
                num_images=len(keys),
                prompt_len_estimate=input_lens[i],
                image_keys=keys,
            )
        else:
            request = BenchRequest(output_lens[i], prompt=prompt, prompt_len_estimate=input_lens[i])
        requests.append(request)
    return requests


def _video_requests(spec: RandomSpec, rng: np.random.Generator) -> list[BenchRequest]:
    from bench.serve.videos import random_clip, video_part

    text = TextMaker(rng, spec.tokenizer)
    input_lens = sample_lens(rng, spec.input_len, spec.range_ratio, spec.num_requests)
    output_lens = sample_lens(rng, spec.output_len, spec.range_ratio, spec.num_requests)
    requests = []
    for i in range(spec.num_requests):
        parts = [video_part(random_clip(rng, spec.video))]
        parts.append({"type": "text", "text": text.make(input_lens[i])})
        messages = [{"role": "user", "content": parts}]
        requests.append(BenchRequest(output_lens[i], messages, None, 1, input_lens[i], (i,)))
    return requests


def _repeat_flags(rng: np.random.Generator, n: int, ratio: float) -> list[bool]:
    """Exactly round(ratio * n) requests reuse images, never the first (nothing seen yet)."""
    num_repeats = min(max(n - 1, 0), round(ratio * n))
    flags = [False] * n
    if num_repeats:
        for i in rng.choice(np.arange(1, n), size=num_repeats, replace=False):
            flags[int(i)] = True
    return flags


class _ImagePool:
    """Distinct noise images in order of first use; a repeat picks earlier ones."""

    def __init__(self, rng: np.random.Generator, buckets: ImageBuckets) -> None:
        self._rng = rng
        self._buckets = buckets
        self._probs = np.asarray(buckets.weights) / sum(buckets.weights)
        self._urls: list[str] = []

    def draw(self, count: int, reuse: bool) -> tuple[int, ...]:
        if reuse and self._urls:
            return tuple(int(k) for k in self._rng.integers(0, len(self._urls), size=count))
        keys = []
        for _ in range(count):
            index = int(self._rng.choice(len(self._buckets.sizes), p=self._probs))
            width, height = self._buckets.sizes[index]
            self._urls.append(data_url(noise_png(self._rng, width, height)))
            keys.append(len(self._urls) - 1)
        return tuple(keys)

    def url(self, key: int) -> str:
        return self._urls[key]


def jsonl_requests(path: str, chat: bool, default_max_tokens: int | None) -> list[BenchRequest]:
    """One request per line: {"prompt" | "messages", "max_tokens"?, "image"?: path or [paths]}.

    Image paths are relative to the file's folder. With a `prompt`, images come before the text
    in one user message; with `messages`, they are put in front of the last user message.
    """
    file = Path(path)
    if not file.is_file():
        raise DatasetError(f"dataset file {path} not found")
    requests = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path}:{number}: expected a JSON object")
        requests.append(_jsonl_request(row, file.parent, chat, default_max_tokens, number))
    if not requests:
        raise DatasetError(f"{path} has no requests")
    return requests


def _jsonl_request(
    row: dict, folder: Path, chat: bool, default_max_tokens: int | None, number: int
) -> BenchRequest:
    where = f"line {number}"
    max_tokens = row.get("max_tokens", default_max_tokens)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise DatasetError(f"{where}: max_tokens must be a positive integer")
    images = row.get("image") or []
    images = [images] if isinstance(images, str) else list(images)
    prompt, messages = row.get("prompt"), row.get("messages")
    if (prompt is None) == (messages is None):
        raise DatasetError(f"{where}: give exactly one of 'prompt' and 'messages'")
    if not chat:
        if prompt is None or images:
            raise DatasetError(f"{where}: /v1/completions takes a text 'prompt' and no images")
        return BenchRequest(max_tokens, prompt=str(prompt), prompt_len_estimate=_words(prompt))
    parts = [image_part(_image_url(folder / image, where)) for image in images]
    if prompt is not None:
        messages = [{"role": "user", "content": [*parts, {"type": "text", "text": str(prompt)}]}]
    elif parts:
        messages = _with_images(messages, parts, where)
    estimate = sum(_words(_message_text(m)) for m in messages)
    return BenchRequest(
        max_tokens, messages=messages, num_images=len(parts), prompt_len_estimate=estimate
    )


def _with_images(messages: list, parts: list[dict], where: str) -> list[dict]:
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise DatasetError(f"{where}: 'image' needs a user message to attach to")
    messages = [dict(m) for m in messages]
    last = messages[users[-1]]
    content = last.get("content") or []
    content = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    last["content"] = [*parts, *content]
    return messages


def _image_url(path: Path, where: str) -> str:
    if not path.is_file():
        raise DatasetError(f"{where}: image {path} not found")
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return data_url(path.read_bytes(), mime)


def _message_text(message: dict) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else []
    return " ".join(p.get("text", "") for p in parts if isinstance(p, dict))


def _words(text: object) -> int:
    return len(str(text).split())
