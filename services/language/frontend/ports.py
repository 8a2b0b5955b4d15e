"""The front end's partners as it sees them: the engine and the image encoder.

`AsyncEngine` and `EncodeClient` implement these; tests pass in-process stand-ins of the same
shape. The front end calls nothing else on them, so a new engine or encoder only has to
provide what is written here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from services.language.engine.admission import AdmissionControl
from services.language.engine.core import EngineStats
from services.language.engine.request import GenerationRequest, RequestOutput
from services.language.engine.tokenizer import LanguageTokenizer
from shared.model.config import ModelConfig
from shared.wire.images import EncodedImage, ImageRef


class EngineClient(Protocol):
    """What the front end asks of the engine."""

    admission: AdmissionControl

    @property
    def tokenizer(self) -> LanguageTokenizer: ...

    @property
    def model_config(self) -> ModelConfig: ...

    @property
    def max_model_len(self) -> int: ...

    def stats(self) -> EngineStats:
        """Counters and gauges for the metrics collector."""
        ...

    def health(self) -> tuple[bool, str]:
        """(serving, reason)."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Submit; raises at once when the request cannot be queued."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def provide_images(self, request_id: str, items: list[tuple[int, EncodedImage]]) -> None:
        """Images a request was submitted without (PendingImage placeholders) arrived."""
        ...

    def fail_request(self, request_id: str, error: Exception) -> None:
        """End one request with `error`."""
        ...

    def close(self, reason: str) -> None:
        """Refuse new requests with `reason`."""
        ...

    async def fail_all(self, reason: str) -> None:
        """End every running request with an error."""
        ...


class ImageEncoder(Protocol):
    """What the front end asks of the encode side: packed embeddings for images, in order."""

    async def encode(self, images: Sequence[ImageRef]) -> list[EncodedImage]: ...

    def encode_each(self, images: Sequence[ImageRef]) -> AsyncIterator[tuple[int, EncodedImage]]:
        """(index, image) as each is encoded, in the order they finish."""
        ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """Whether an image sent now could be encoded (a replica answers SERVING)."""
        ...
