"""data: URL payloads on the encode side: base64 and percent-encoded, with size limits."""

from __future__ import annotations

import asyncio
import base64

import pytest

from services.encode.sources import ImageSourceError, decode_data_url, fetch_url

PAYLOAD = bytes(range(256)) * 4


def test_base64_and_percent_encoded_payloads_decode():
    encoded = base64.b64encode(PAYLOAD).decode()
    assert decode_data_url(f"data:image/png;base64,{encoded}", 4096) == PAYLOAD
    assert decode_data_url("data:,a%20b%FF", 16) == b"a b\xff"


@pytest.mark.parametrize(
    ("url", "max_bytes", "fragment"),
    [
        ("data:image/png;base64", 100, "no ','"),
        ("data:image/png;base64,not*base64!", 100, "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(PAYLOAD).decode(), 512, "above the limit"),
        ("data:," + "a" * 300, 100, "image limit"),
        ("data:," + "a" * 60, 50, "over the limit"),
    ],
)
def test_bad_or_oversized_data_urls_raise_source_errors(url, max_bytes, fragment):
    with pytest.raises(ImageSourceError, match=fragment):
        decode_data_url(url, max_bytes)


def test_fetch_url_refuses_http_unless_enabled():
    with pytest.raises(ImageSourceError, match="allow-url-fetch"):
        asyncio.run(fetch_url("http://example.com/a.png", 100, 1.0, allow_http=False))
    assert asyncio.run(fetch_url("data:,ok", 100, 1.0, allow_http=False)) == b"ok"
