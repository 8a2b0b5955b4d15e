"""Helpers for the language API tests: a servable tiny checkpoint, images, HF reference outputs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from scripts.testkit.tokenizers import save_tokenizer
from services.language.encoder.client import EncodedImage
from shared.wire.images import ImageRef

# The Qwen3-VL chat template, as shipped with the small model's tooling
QWEN3_VL_TEMPLATE = (
    Path(__file__).resolve().parents[2] / "scripts" / "shapes_vl" / "qwen3_vl_chat_template.jinja"
)


def template_source() -> str:
    """The Qwen3-VL chat template."""
    return QWEN3_VL_TEMPLATE.read_text()


def servable_copy(checkpoint_dir: Path, dest: Path) -> Path:
    """Copy a tokenizer-less tiny checkpoint and add a tokenizer whose vision ids match it."""
    from shared.model.config import load_config

    shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
    config = load_config(dest)
    pinned = {
        "<|image_pad|>": config.image_token_id,
        "<|video_pad|>": config.video_token_id,
        "<|vision_start|>": config.vision_start_token_id,
        "<|vision_end|>": config.vision_end_token_id,
    }
    save_tokenizer(dest, template_source(), pinned, vocab_size=config.text.vocab_size)
    return dest


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A deterministic picture: a coloured background with a shape on it."""
    colors = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (230, 200, 40)]
    image = Image.new("RGB", (width, height), colors[seed % 4])
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=colors[~seed % 4])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    """A base64 data URL."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class InProcessEncoder:
    """The vision tower run in this process, as the front end's `ImageEncoder`; for API tests that
    are not about the transport."""

    def __init__(self, model_dir: Path) -> None:
        from shared.model.loader import load_vision_model
        from shared.model.processing import load_image_processor_config

        self.processor = load_image_processor_config(model_dir)
        self.model = load_vision_model(model_dir).eval()
        self.num_calls = 0

    def encode_sync(self, data: bytes) -> EncodedImage:
        """One image -> its packed embeddings, as the encode service computes them."""
        from shared.model.processing import decode_image, preprocess_image

        pixels, grid = preprocess_image(decode_image(data), self.processor)
        with torch.no_grad():
            packed = self.model(pixels, torch.tensor([grid]))
        digest = hashlib.sha256(data).hexdigest()
        return EncodedImage(packed, grid, digest, cache_hit=False, source="in-process")

    async def encode(self, images: Sequence[ImageRef]) -> list[EncodedImage]:
        """EncodeClient.encode's interface, computed off the event loop."""
        self.num_calls += 1
        return await asyncio.to_thread(lambda: [self.encode_sync(i.data) for i in images])

    async def encode_each(self, images: Sequence[ImageRef]):
        """EncodeClient.encode_each's interface: (index, image) pairs, here all at the end."""
        for index, image in enumerate(await self.encode(images)):
            yield index, image

    async def ready(self) -> bool:
        """Always: the tower is in this process."""
        return True

    async def close(self) -> None:
        """Nothing to release: no channels or links."""


@torch.no_grad()
def greedy_disagreements(
    hf_model,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    image_token_id: int,
    pixel_values: torch.Tensor | None = None,
    grid_thw: torch.Tensor | None = None,
    tie_gap: float = 1e-4,
) -> list[str]:
    """Teacher-forced greedy check of `output_ids` against transformers.

    Feeds prompt + output to the HF model once; every output token must be HF's argmax at its
    position, unless HF's top-2 logits there are within `tie_gap` (a near-tie that float noise
    may flip). Returns a description of each real disagreement (empty: the outputs agree).
    """
    ids = torch.tensor([*prompt_ids, *output_ids], dtype=torch.long)
    kwargs = {}
    if pixel_values is not None:
        kwargs = dict(
            pixel_values=pixel_values,
            image_grid_thw=grid_thw,
            mm_token_type_ids=(ids == image_token_id).long()[None],
        )
    logits = hf_model(input_ids=ids[None], **kwargs).logits[0].float()
    problems = []
    for step, token in enumerate(output_ids):
        row = logits[len(prompt_ids) - 1 + step]
        top2 = torch.topk(row, 2)
        best, gap = int(top2.indices[0]), float(top2.values[0] - top2.values[1])
        if token != best and float(row[best] - row[token]) >= tie_gap:
            problems.append(f"step {step}: got {token}, HF argmax {best} (top-2 gap {gap:.2e})")
    return problems


def hf_image_inputs(model_dir: Path, images: Sequence[bytes]):
    """pixel_values and grid_thw for HF, preprocessed as the encode service does."""
    from shared.model.processing import (
        decode_image,
        load_image_processor_config,
        preprocess_image,
    )

    cfg = load_image_processor_config(model_dir)
    pixels, grids = zip(*(preprocess_image(decode_image(d), cfg) for d in images), strict=True)
    return torch.cat(pixels), torch.tensor(grids)


def read_metrics(base_url: str, labeled: bool = False) -> dict[str, float]:
    """The language service's Prometheus samples by name (`name{k="v"}` with `labeled`)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                samples[sample.name] = sample.value
            elif labeled:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def wait_for_idle_kv(base_url: str, timeout_s: float = 15.0) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and every KV block is free."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        m = read_metrics(base_url)
        idle = (
            m["splitvl_language_num_requests_running"] == 0
            and m["splitvl_language_num_requests_waiting"] == 0
            and m["splitvl_language_kv_cache_free_blocks"]
            == m["splitvl_language_kv_cache_total_blocks"]
        )
        if idle:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks still in use after {timeout_s} s: {m}")
        time.sleep(0.05)
