"""Per-request image controls: how many images a prompt may hold, per-request pixel limits
(`mm_processor_kwargs`), and an image's token count computed without encoding it.

The encode service resizes each image with `smart_resize` between `min_pixels` and `max_pixels`;
a request may choose its own limits within this server's. Where a request sets only `max_pixels`,
`min_pixels` defaults to the smaller of the checkpoint's and that value, the encode service's
rule, so a token count computed here equals the one the encode service produces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.language.errors import BadRequestError, ImageInputError
from services.language.frontend.video_policy import VIDEO_KWARGS, check_media_count
from shared.model.processing import ImageError, ImageProcessorConfig, smart_resize

PIXEL_KWARGS = ("min_pixels", "max_pixels")


@dataclass(frozen=True)
class PixelLimits:
    """A request's own resize bounds; None leaves the encode service's default."""

    min_pixels: int | None = None
    max_pixels: int | None = None


@dataclass(frozen=True)
class ImagePolicy:
    """The server's image limits; `processor` is None for text-only models."""

    processor: ImageProcessorConfig | None = None
    max_images_per_prompt: int | None = None  # --limit-mm-per-prompt '{"image": N}'

    def __post_init__(self) -> None:
        if self.max_images_per_prompt is not None and self.max_images_per_prompt < 0:
            raise ValueError("max_images_per_prompt must be >= 0")

    def check_count(self, num_images: int) -> None:
        """400 when a prompt holds more images than the server allows (before any is loaded)."""
        check_media_count("images", num_images, self.max_images_per_prompt)

    def pixel_limits(self, kwargs: Mapping[str, Any] | None) -> PixelLimits:
        """Validate `mm_processor_kwargs` against this server's limits."""
        if not kwargs:
            return PixelLimits()
        known = (*PIXEL_KWARGS, *VIDEO_KWARGS)  # the video ones are VideoPolicy's
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise BadRequestError(
                f"mm_processor_kwargs {unknown} are not supported; only {list(known)} are",
                param="mm_processor_kwargs",
            )
        values = {}
        for name in PIXEL_KWARGS:
            value = kwargs.get(name)
            if value is not None and (type(value) is not int or value < 1):
                raise BadRequestError(
                    f"mm_processor_kwargs.{name} must be a positive integer, got {value!r}",
                    param=f"mm_processor_kwargs.{name}",
                )
            values[name] = value
        limits = PixelLimits(**values)
        if self.processor is not None:
            self._check_bounds(limits)
        return limits

    def _check_bounds(self, limits: PixelLimits) -> None:
        ceiling = self.processor.max_pixels
        if limits.max_pixels is not None and limits.max_pixels > ceiling:
            raise BadRequestError(
                f"mm_processor_kwargs.max_pixels {limits.max_pixels} is over this server's "
                f"limit of {ceiling} pixels",
                param="mm_processor_kwargs.max_pixels",
            )
        low, high = self.bounds(limits)
        if low > high:
            raise BadRequestError(
                f"mm_processor_kwargs.min_pixels {low} is greater than max_pixels {high}",
                param="mm_processor_kwargs.min_pixels",
            )

    def bounds(self, limits: PixelLimits) -> tuple[int, int]:
        """The (min_pixels, max_pixels) an image of this request is resized between."""
        cfg = self.processor
        high = limits.max_pixels or cfg.max_pixels
        low = limits.min_pixels or min(cfg.min_pixels, high)
        return low, high

    def grid(self, width: int, height: int, limits: PixelLimits) -> tuple[int, int, int]:
        """The patch grid (1, h' / patch, w' / patch) the encode service will give the image."""
        cfg = self.processor
        low, high = self.bounds(limits)
        try:
            h, w = smart_resize(height, width, cfg.factor, low, high)
        except ImageError as exc:
            raise ImageInputError(str(exc)) from exc
        return 1, h // cfg.patch_size, w // cfg.patch_size

    def num_tokens(self, width: int, height: int, limits: PixelLimits) -> int:
        """Language tokens of a width x height image: (h' / factor) * (w' / factor)."""
        _, gh, gw = self.grid(width, height, limits)
        return gh * gw // self.processor.merge_size**2
