"""Loading the bytes of image and video parts: `data:` URLs, http(s) URLs when the operator
enables them, and `file://` URLs under one directory the operator names.

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
from shared.wire.dataurl import (
    IMAGE_TYPES,
    VIDEO_TYPES,
    DataURLError,
    DataURLTooLargeError,
    decode_data_url,
)
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
    max_video_bytes: int = 128 * 2**20

    def __post_init__(self) -> None:
        if min(self.max_image_bytes, self.max_image_pixels, self.max_video_bytes) <= 0:
            raise ValueError("max_image_bytes, max_image_pixels, max_video_bytes must be positive")
        if self.fetch_timeout_s <= 0:
            raise ValueError(f"fetch_timeout_s must be positive, got {self.fetch_timeout_s}")
        self.fetch_policy()  # checks the redirect limit and the CIDRs

    def fetch_policy(self, max_bytes: int | None = None) -> FetchPolicy:
        """The limits and address policy of http(s) image (or video: `max_bytes`) fetches."""
        return FetchPolicy(
            max_bytes or self.max_image_bytes,
            self.fetch_timeout_s,
            self.max_redirects,
            self.allowed_networks,
        )


def decode_image_data_url(url: str, max_bytes: int, media_types=IMAGE_TYPES) -> bytes:
    """The bytes of a `data:image/...` URL (base64 or percent-encoded; `data:video/...` with
    `VIDEO_TYPES`), size checked first."""
    try:
        return decode_data_url(url, max_bytes, media_types)
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
        self._fetchers = {
            "image": SafeFetcher(config.fetch_policy(), resolver),
            "video": SafeFetcher(config.fetch_policy(config.max_video_bytes), resolver),
        }
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
        return self.check(await self._load(url, "image", self.config.max_image_bytes))

    async def load_video(self, url: str) -> bytes:
        """The video file behind `url` (size checked; the encode service decodes it)."""
        return self.check_video(await self._load(url, "video", self.config.max_video_bytes))

    def check_video(self, data: bytes) -> bytes:
        limit = self.config.max_video_bytes
        if not data:
            raise ImageInputError("video data is empty")
        if len(data) > limit:
            raise ImageTooLargeError(f"video is {len(data)} bytes, above the limit of {limit}")
        return data

    async def _load(self, url: str, kind: str, limit: int) -> bytes:
        if not isinstance(url, str) or not url:
            raise ImageInputError(f"{kind}_url.url must be a non-empty string")
        scheme = url.split(":", 1)[0].lower()
        if scheme == "data":
            types = IMAGE_TYPES if kind == "image" else VIDEO_TYPES
            if len(url) > _INLINE_DECODE_CHARS:  # megabytes of base64: off the event loop
                return await asyncio.to_thread(decode_image_data_url, url, limit, types)
            return decode_image_data_url(url, limit, types)
        if scheme in ("http", "https"):
            if not self.config.allow_http:
                raise ImageInputError(
                    f"http(s) {kind} URLs are disabled on this server; send the {kind} as a "
                    f"base64 data URL ('data:{kind}/...;base64,...')"
                )
            return await self._fetch(url, kind)
        if scheme == "file":
            return await asyncio.to_thread(self._read_local, url, kind, limit)
        raise ImageInputError(
            f"unsupported {kind} URL scheme {scheme!r} in {short_url(url)!r}; use a data: URL"
            + (" or http(s)" if self.config.allow_http else "")
        )

    def _read_local(self, url: str, kind: str, limit: int) -> bytes:
        root = self._media_root
        if root is None:
            raise ImageInputError(
                f"file:// {kind} URLs are disabled on this server (it was started without "
                f"--allowed-local-media-path); send the {kind} as a base64 data URL"
            )
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ImageInputError(
                f"{short_url(url)!r} is not an absolute local file URL (file:///path/to/file)"
            )
        path = Path(unquote(parts.path)).resolve()
        if not path.is_relative_to(root):
            raise ImageInputError(
                f"{kind} file {short_url(url)!r} is outside the allowed directory {root}"
            )
        if not path.is_file():
            raise ImageInputError(f"{kind} file {short_url(url)!r} does not exist")
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise ImageTooLargeError(f"{kind} file is over the limit of {limit} bytes")
        return data

    def check(self, data: bytes) -> bytes:
        """Return `data` if it is an image within the byte and pixel limits; raise otherwise."""
        limit = self.config.max_image_bytes
        if len(data) > limit:
            raise ImageTooLargeError(f"image is {len(data)} bytes, above the limit of {limit}")
        check_image_bytes(data, self.config.max_image_pixels)
        return data

    async def _fetch(self, url: str, kind: str) -> bytes:
        try:
            return await self._fetchers[kind].fetch(url)
        except FetchTooLargeError as exc:
            raise ImageTooLargeError(f"{kind}: {exc}") from exc
        except FetchError as exc:
            raise ImageInputError(f"{kind} URL: {exc}") from exc
