"""Image bytes from a request: inline data, a data: URL, or (when enabled) an http(s) URL."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes, urlsplit

import httpx

from shared.wire.dataurl import DataURLError, decode_base64_payload, split_data_url


class ImageSourceError(ValueError):
    """An image reference cannot be turned into bytes (bad URL, fetch failure, too large)."""


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The payload of a data:[<mime>][;base64],<data> URL (base64 or percent-encoded)."""
    try:
        parsed = split_data_url(url)
        if parsed.is_base64:
            return decode_base64_payload(parsed.payload, max_bytes)
    except DataURLError as exc:
        raise ImageSourceError(str(exc)) from exc
    if len(parsed.payload) > 2 * max_bytes:  # cheap pre-check before decoding
        raise ImageSourceError(f"data: URL is over the {max_bytes}-byte image limit")
    data = unquote_to_bytes(parsed.payload)
    if len(data) > max_bytes:
        raise ImageSourceError(f"image is {len(data)} bytes, over the limit of {max_bytes}")
    return data


async def fetch_url(url: str, max_bytes: int, timeout_s: float, allow_http: bool) -> bytes:
    """Bytes behind a data: URL, or behind an http(s) URL when allow_http is set."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "data":
        return decode_data_url(url, max_bytes)
    if scheme not in ("http", "https"):
        raise ImageSourceError(f"unsupported URL scheme {scheme!r}; use data:, http: or https:")
    if not allow_http:
        raise ImageSourceError(
            "this encode service does not fetch http(s) URLs (start it with --allow-url-fetch) "
            "; send the image bytes instead"
        )
    try:
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise ImageSourceError(f"fetching {url} gave HTTP {response.status_code}")
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise ImageSourceError(f"image at {url} is over {max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise ImageSourceError(f"cannot fetch {url}: {exc!r}") from exc
