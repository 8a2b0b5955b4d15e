"""data: URLs, as clients send images to either service: one decoder for both."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes


class DataURLError(ValueError):
    """A data: URL that is malformed or whose base64 payload does not decode."""


class DataURLTooLargeError(DataURLError):
    """A data: URL whose payload decodes to more bytes than allowed."""


@dataclass(frozen=True)
class DataURL:
    """The parts of data:[<mime>][;<param>...],<payload> (mime and params lower-cased)."""

    mime: str
    params: tuple[str, ...]
    payload: str

    @property
    def is_base64(self) -> bool:
        """Whether the payload is base64 (otherwise it is percent-encoded)."""
        return "base64" in self.params


def split_data_url(url: str) -> DataURL:
    """Split a data: URL into media type, parameters and payload; DataURLError without a ','."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise DataURLError("data URL has no ',' separating the header from the data")
    media = header[len("data:") :].split(";")
    mime = media[0].strip().lower()
    return DataURL(mime, tuple(p.strip().lower() for p in media[1:]), payload)


def decode_base64_payload(payload: str, max_bytes: int) -> bytes:
    """Decode a data URL's base64 payload, refusing one over max_bytes before decoding it."""
    payload = "".join(payload.split())
    # base64 expands 3 bytes to 4 characters: refuse before allocating the decoded image
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise DataURLTooLargeError(
            f"the data is about {len(payload) // 4 * 3} bytes, above the limit of {max_bytes} bytes"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataURLError(f"data URL is not valid base64: {exc}") from exc
    if len(data) > max_bytes:  # padding lets the estimate above run two bytes short
        raise DataURLTooLargeError(f"the data is {len(data)} bytes, above the limit of {max_bytes}")
    return data


IMAGE_TYPES = ("image/",)
VIDEO_TYPES = ("video/", "image/gif", "image/apng", "image/webp")  # animated images play as clips


def decode_data_url(url: str, max_bytes: int, media_types: tuple[str, ...] = IMAGE_TYPES) -> bytes:
    """The bytes of a data:[<mime>][;base64],<data> URL, base64 or percent-encoded (RFC 2397),
    refused before decoding when it cannot fit `max_bytes`; a media type given must start with
    one of `media_types`."""
    parsed = split_data_url(url)
    if parsed.mime and not parsed.mime.startswith(media_types):
        example = (
            "data:video/mp4;base64,..."
            if media_types is VIDEO_TYPES
            else ("data:image/png;base64,...")
        )
        raise DataURLError(
            f"data URL media type {parsed.mime!r} is not one of {', '.join(media_types)} "
            f"({example!r})"
        )
    if parsed.is_base64:
        return decode_base64_payload(parsed.payload, max_bytes)
    # Percent-encoding spends 1 to 3 characters per byte: anything longer cannot fit
    if len(parsed.payload) > 3 * max_bytes:
        raise DataURLTooLargeError(f"data URL is over the limit of {max_bytes} bytes")
    data = unquote_to_bytes(parsed.payload)
    if len(data) > max_bytes:
        raise DataURLTooLargeError(f"the data is {len(data)} bytes, above the limit of {max_bytes}")
    return data
