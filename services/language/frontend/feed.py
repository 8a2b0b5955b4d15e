"""Handing a prompt's images to the engine as each is encoded (time to first token).

The prompt went to the engine laid out from the files' headers (`media.MediaPlan`), each image
a placeholder; the engine computes the text before the first missing image meanwhile. Each
encoded image is checked against its plan (grid, a video's group times) and handed to every
choice of the request; a failed encode fails those requests with the client-facing error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress

from services.language.encoder.client import EncodeError
from services.language.errors import ImageInputError
from services.language.frontend.failures import encode_failure
from services.language.frontend.media import MediaPlan
from services.language.frontend.metrics import LanguageMetrics
from services.language.frontend.ports import EngineClient, ImageEncoder
from shared.wire.images import EncodedImage

log = logging.getLogger(__name__)


class MediaFeed:
    """One request's encodes, started once its choices are in the engine."""

    def __init__(
        self,
        plan: MediaPlan,
        encoder: ImageEncoder,
        engine: EngineClient,
        metrics: LanguageMetrics,
        retry_after_s: int,
    ) -> None:
        self.plan = plan
        self._encoder = encoder
        self._engine = engine
        self._metrics = metrics
        self._retry_after_s = retry_after_s
        self._task: asyncio.Task | None = None

    def start(self, request_ids: list[str]) -> None:
        self._task = asyncio.ensure_future(self._run(request_ids))

    async def cancel(self) -> None:
        """Stop encoding (the request ended or its client left)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def _run(self, request_ids: list[str]) -> None:
        start = time.monotonic()
        slots = self.plan.slots()
        try:
            refs = [part.ref for part in self.plan.parts]
            async for index, image in self._encoder.encode_each(refs):
                items = list(zip(slots[index], self._checked(index, image).groups(), strict=True))
                for request_id in request_ids:
                    self._engine.provide_images(request_id, items)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure ends the requests with a reason
            error = exc
            if isinstance(exc, EncodeError):
                error = encode_failure(exc, self._retry_after_s)
            log.info("image encoding failed for %s: %s", request_ids[0], exc)
            for request_id in request_ids:
                self._engine.fail_request(request_id, error)
            return
        self._metrics.encode_latency.observe(time.monotonic() - start)

    def _checked(self, index: int, image: EncodedImage) -> EncodedImage:
        part = self.plan.parts[index]
        if tuple(image.grid_thw) != tuple(part.grid_thw) or image.timestamps != part.timestamps:
            raise ImageInputError(
                f"image {index} was encoded as grid {tuple(image.grid_thw)} (group times "
                f"{list(image.timestamps)}), but its headers gave {tuple(part.grid_thw)} "
                f"({list(part.timestamps)}): the encode service processes it differently from "
                "this server (pixel limits, sampling); start them with the same checkpoint"
            )
        return image
