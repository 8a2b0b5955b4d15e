"""In-process language servers with the chat options (tools, reasoning, image limits) that
`tests.e2e.inprocess.language_server` does not expose, and an encoder honouring pixel limits."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import torch

from services.language.engine import EngineConfig
from services.language.frontend.images import ImageFetchConfig
from services.language.frontend.pipeline import FrontendOptions
from tests.e2e.inprocess import language_server
from tests.e2e.support import InProcessEncoder

SHAPES_VL = Path(__file__).resolve().parents[2] / "models" / "shapes-vl"


class PixelLimitEncoder(InProcessEncoder):
    """The in-process vision tower, resizing with each ImageRef's min/max pixels as the encode
    service does (its rule: min defaults to min(checkpoint min, max))."""

    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir)
        self.refs: list = []  # every ImageRef received, for assertions

    def encode_ref(self, ref):
        import hashlib

        from services.language.encoder.client import EncodedImage
        from shared.model.processing import decode_image, preprocess_image

        high = ref.max_pixels or self.processor.max_pixels
        low = ref.min_pixels or min(self.processor.min_pixels, high)
        cfg = self.processor.with_pixel_limits(low, high)
        pixels, grid = preprocess_image(decode_image(ref.data), cfg)
        with torch.no_grad():
            packed = self.model(pixels, torch.tensor([grid]))
        return EncodedImage(packed, grid, hashlib.sha256(ref.data).hexdigest(), source="test")

    async def encode(self, images: Sequence) -> list:
        self.num_calls += 1
        self.refs.extend(images)
        return await asyncio.to_thread(lambda: [self.encode_ref(ref) for ref in images])


def chat_server(
    model_dir: Path,
    encoder=None,
    options: FrontendOptions | None = None,
    chat_template: str | None = None,
    fetch: ImageFetchConfig | None = None,
    model_name: str = "shapes-vl",
    engine_config: EngineConfig | None = None,
):
    """An in-process HTTP server on the shipped model's sizes with the given front-end options."""
    config = engine_config or EngineConfig(kv_cache_memory=32 * 2**20, max_model_len=2048)
    return language_server(
        model_dir,
        encoder,
        config,
        fetch=fetch,
        model_name=model_name,
        options=options,
        chat_template=chat_template,
    )
