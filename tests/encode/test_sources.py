"""Image URLs on the encode side: data: URLs (base64 and percent-encoded, with size limits), and
http(s) fetches only when enabled and only from public addresses (the same policy as the
language service's)."""

from __future__ import annotations

import asyncio
import base64

import pytest

from services.encode.sources import ImageSourceError, ImageSources
from shared.wire.dataurl import DataURLError, DataURLTooLargeError, decode_data_url
from shared.wire.fetch import FetchPolicy

PAYLOAD = bytes(range(256)) * 4


def load(sources: ImageSources, url: str) -> bytes:
    return asyncio.run(sources.load(url))


def test_base64_and_percent_encoded_payloads_decode():
    encoded = base64.b64encode(PAYLOAD).decode()
    assert decode_data_url(f"data:image/png;base64,{encoded}", 4096) == PAYLOAD
    assert decode_data_url("data:,a%20b%FF", 16) == b"a b\xff"
    assert load(ImageSources(FetchPolicy(max_bytes=16), False), "data:,a%20b%FF") == b"a b\xff"


@pytest.mark.parametrize(
    ("url", "max_bytes", "error", "fragment"),
    [
        ("data:image/png;base64", 100, DataURLError, "no ','"),
        ("data:image/png;base64,not*base64!", 100, DataURLError, "not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", 100, DataURLError, "is not one of image/"),
        (
            "data:image/png;base64," + base64.b64encode(PAYLOAD).decode(),
            512,
            DataURLTooLargeError,
            "above the limit",
        ),
        ("data:," + "a" * 301, 100, DataURLTooLargeError, "over the limit"),
        ("data:," + "a" * 60, 50, DataURLTooLargeError, "above the limit"),
    ],
)
def test_bad_or_oversized_data_urls(url, max_bytes, error, fragment):
    with pytest.raises(error, match=fragment):
        decode_data_url(url, max_bytes)
    with pytest.raises(ImageSourceError, match=fragment):
        load(ImageSources(FetchPolicy(max_bytes=max_bytes), False), url)


def test_http_is_refused_unless_enabled_and_then_only_from_public_addresses():
    with pytest.raises(ImageSourceError, match="allow-url-fetch"):
        load(ImageSources(FetchPolicy(), allow_http=False), "http://example.com/a.png")
    enabled = ImageSources(FetchPolicy(timeout_s=2.0), allow_http=True)
    for url in ("http://127.0.0.1/a.png", "http://169.254.169.254/latest", "http://[::1]/a"):
        with pytest.raises(ImageSourceError, match="non-public address"):
            load(enabled, url)
    with pytest.raises(ImageSourceError, match="unsupported URL scheme"):
        load(enabled, "ftp://example.com/a.png")
