"""Loading the bytes of image parts: `data:` URLs, http(s) URLs when the operator enables them, and
`file://` URLs under one directory the operator names.

http(s) URLs go through the public-address fetcher both services share (`shared.wire.fetch`:
every hop resolved and vetted, the connection pinned to the vetted address, byte and time
limits). A `file://` path is resolved (symlinks followed) before it is checked, so neither `..`
nor a link can reach outside the allowed directory.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image, UnidentifiedImageError

from services.language.errors import ImageInputError, ImageTooLargeError
from shared.wire.dataurl import DataURLError, DataURLTooLargeError, decode_data_url
from shared.wire.fetch import (
    FetchError,
    FetchPolicy,
    FetchTooLargeError,
    Resolver,
    SafeFetcher,
    short_url,
    system_resolver,
)

_INLINE_DECODE_CHARS = 256 * 1024


@dataclass(frozen=True)
class ImageFetchConfig:
    """Limits and permissions for loading image parts.

    `allowed_networks` lists CIDRs exempt from the non-global-address block, for operators whose
    image store lives on a private network; it is empty by default.
    """

    allow_http: bool = False
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 8192 * 8192
    fetch_timeout_s: float = 10.0
    max_redirects: int = 3
    allowed_networks: tuple[str, ...] = ()
    allowed_local_media_path: str | None = None  # file:// URLs are served from here only

    def __post_init__(self) -> None:
        if self.max_image_bytes <= 0 or self.max_image_pixels <= 0:
            raise ValueError("max_image_bytes and max_image_pixels must be positive")
        if self.fetch_timeout_s <= 0:
            raise ValueError(f"fetch_timeout_s must be positive, got {self.fetch_timeout_s}")
        self.fetch_policy()  # checks the redirect limit and the CIDRs

    def fetch_policy(self) -> FetchPolicy:
        """The limits and address policy of http(s) image fetches."""
        return FetchPolicy(
            self.max_image_bytes, self.fetch_timeout_s, self.max_redirects, self.allowed_networks
        )


def decode_image_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/...` URL (base64 or percent-encoded), size checked first."""
    try:
        return decode_data_url(url, max_bytes)
    except DataURLTooLargeError as exc:
        raise ImageTooLargeError(str(exc)) from exc
    except DataURLError as exc:
        raise ImageInputError(str(exc)) from exc


def check_image_bytes(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Read only the image header; return (width, height) or raise if it is not a usable image."""
    if not data:
        raise ImageInputError("image data is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image has too many pixels: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageInputError(
            "image data is not a recognized image format (PNG, JPEG, WebP, GIF, BMP, ...)"
        ) from exc
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
        )
    return width, height


class ImageLoader:
    """Turns an image part's URL into checked image bytes. `resolver` replaces the system's
    (tests stub it to give names private or changing answers)."""

    def __init__(self, config: ImageFetchConfig, resolver: Resolver = system_resolver) -> None:
        self.config = config
        self._fetcher = SafeFetcher(config.fetch_policy(), resolver)
        self._media_root: Path | None = None
        if config.allowed_local_media_path is not None:
            root = Path(config.allowed_local_media_path).resolve()
            if not root.is_dir():
                raise FileNotFoundError(
                    f"--allowed-local-media-path {config.allowed_local_media_path} is not a "
                    "directory"
                )
            self._media_root = root

    async def load(self, url: str) -> bytes:
        """Return the image bytes behind `url`; raises ImageInputError or ImageTooLargeError."""
        if not isinstance(url, str) or not url:
            raise ImageInputError("image_url.url must be a non-empty string")
        scheme = url.split(":", 1)[0].lower()
        if scheme == "data":
            if len(url) > _INLINE_DECODE_CHARS:  # megabytes of base64: off the event loop
                data = await asyncio.to_thread(
                    decode_image_data_url, url, self.config.max_image_bytes
                )
            else:
                data = decode_image_data_url(url, self.config.max_image_bytes)
        elif scheme in ("http", "https"):
            if not self.config.allow_http:
                raise ImageInputError(
                    "http(s) image URLs are disabled on this server; send the image as a "
                    "base64 data URL ('data:image/png;base64,...')"
                )
            data = await self._fetch(url)
        elif scheme == "file":
            data = await asyncio.to_thread(self._read_local, url)
        else:
            raise ImageInputError(
                f"unsupported image URL scheme {scheme!r} in {short_url(url)!r}; use a data: URL"
                + (" or http(s)" if self.config.allow_http else "")
            )
        return self.check(data)

    def _read_local(self, url: str) -> bytes:
        root = self._media_root
        if root is None:
            raise ImageInputError(
                "file:// image URLs are disabled on this server (it was started without "
                "--allowed-local-media-path); send the image as a base64 data URL"
            )
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ImageInputError(
                f"{short_url(url)!r} is not an absolute local file URL (file:///path/to/image.png)"
            )
        path = Path(unquote(parts.path)).resolve()
        if not path.is_relative_to(root):
            raise ImageInputError(
                f"image file {short_url(url)!r} is outside the allowed directory {root}"
            )
        if not path.is_file():
            raise ImageInputError(f"image file {short_url(url)!r} does not exist")
        limit = self.config.max_image_bytes
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise ImageTooLargeError(f"image file is over the limit of {limit} bytes")
        return data

    def check(self, data: bytes) -> bytes:
        """Return `data` if it is an image within the byte and pixel limits; raise otherwise."""
        limit = self.config.max_image_bytes
        if len(data) > limit:
            raise ImageTooLargeError(f"image is {len(data)} bytes, above the limit of {limit}")
        check_image_bytes(data, self.config.max_image_pixels)
        return data

    async def _fetch(self, url: str) -> bytes:
        try:
            return await self._fetcher.fetch(url)
        except FetchTooLargeError as exc:
            raise ImageTooLargeError(f"image: {exc}") from exc
        except FetchError as exc:
            raise ImageInputError(f"image URL: {exc}") from exc
