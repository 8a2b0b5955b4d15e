"""Image part loading: data URLs, header checks, local files, and the language side of http(s)
fetches (the fetcher itself: tests/wire/test_fetch.py)."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from services.language.errors import ImageInputError, ImageTooLargeError
from services.language.frontend.images import (
    ImageFetchConfig,
    ImageLoader,
    check_image_bytes,
    decode_image_data_url,
)
from shared.wire.fetch import FetchTooLargeError


def png_bytes(width: int = 8, height: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 40)).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def load(loader: ImageLoader, url: str) -> bytes:
    return asyncio.run(loader.load(url))


def test_data_url_round_trip_and_header_check():
    data = png_bytes(9, 5)
    assert load(ImageLoader(ImageFetchConfig()), data_url(data)) == data
    assert check_image_bytes(data, max_pixels=45) == (9, 5)


def test_data_url_with_line_breaks_in_base64_is_accepted():
    data = png_bytes()
    encoded = base64.encodebytes(data).decode()  # wrapped at 76 columns
    assert decode_image_data_url(f"data:image/png;base64,{encoded}", max_bytes=10**6) == data


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("data:image/png;base64,not*base64!", "not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", "is not one of image/"),
        ("data:image/png,rawdata", "not a recognized image"),
        ("data:image/png;base64", "no ','"),
        (data_url(b"hello, not an image"), "not a recognized image"),
        ("data:image/png;base64,", "empty"),
        ("ftp://example.com/a.png", "unsupported image URL scheme"),
        ("http://example.com/a.png", "disabled"),
    ],
)
def test_bad_image_urls_raise_input_errors(url, fragment):
    with pytest.raises(ImageInputError, match=fragment):
        load(ImageLoader(ImageFetchConfig()), url)


def test_oversized_data_url_is_refused_before_decoding():
    data = png_bytes(64, 64)
    with pytest.raises(ImageTooLargeError, match="above the limit"):
        load(ImageLoader(ImageFetchConfig(max_image_bytes=len(data) // 2)), data_url(data))


def test_too_many_pixels_is_refused():
    with pytest.raises(ImageTooLargeError, match="pixels"):
        load(ImageLoader(ImageFetchConfig(max_image_pixels=100)), data_url(png_bytes(20, 20)))


def test_config_validation():
    with pytest.raises(ValueError, match="CIDR"):
        ImageFetchConfig(allowed_networks=("not-a-network",))
    with pytest.raises(ValueError, match="fetch_timeout_s"):
        ImageFetchConfig(fetch_timeout_s=0)


def test_large_data_url_is_decoded_off_the_event_loop():
    import numpy as np

    pixels = np.random.default_rng(1).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    url = data_url(buf.getvalue())
    assert len(url) > 256 * 1024  # takes the threaded path
    assert load(ImageLoader(ImageFetchConfig()), url) == buf.getvalue()


def test_fetch_refusals_are_image_errors_and_oversize_is_413(monkeypatch):
    from shared.wire.fetch import SafeFetcher

    loader = ImageLoader(ImageFetchConfig(allow_http=True))
    with pytest.raises(ImageInputError, match="non-public address"):
        load(loader, "http://127.0.0.1/a.png")

    async def too_large(self, url):
        raise FetchTooLargeError("the response is over the limit of 10 bytes")

    monkeypatch.setattr(SafeFetcher, "fetch", too_large)
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        load(loader, "http://images.example/a.png")
