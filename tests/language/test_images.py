"""Image part loading: data URLs, header checks, and the http(s) fetcher's SSRF guard and limits."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from services.language.errors import ImageInputError, ImageTooLargeError
from services.language.images import (
    ImageFetchConfig,
    ImageLoader,
    check_image_bytes,
    decode_data_url,
    is_address_allowed,
)


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
    assert decode_data_url(f"data:image/png;base64,{encoded}", max_bytes=10**6) == data


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("data:image/png;base64,not*base64!", "not valid base64"),
        ("data:text/plain;base64,aGVsbG8=", "not an image type"),
        ("data:image/png,rawdata", "base64-encoded"),
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


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("fd00::1", False),
        ("fe80::1", False),
        ("224.0.0.1", False),
    ],
)
def test_address_policy(address, allowed):
    import ipaddress

    assert is_address_allowed(ipaddress.ip_address(address)) is allowed


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/a.png",
        "http://localhost:8080/a.png",
        "http://[::1]/a.png",
        "http://[::ffff:127.0.0.1]/a.png",
        "https://169.254.169.254/latest/meta-data",
        "http://10.0.0.5/a.png",
        "http://0.0.0.0/a.png",
    ],
)
def test_private_and_loopback_urls_are_refused(url):
    loader = ImageLoader(ImageFetchConfig(allow_http=True))
    with pytest.raises(ImageInputError, match="non-public address"):
        load(loader, url)


class _Handler(BaseHTTPRequestHandler):
    image = png_bytes(16, 16)

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 - the stdlib's naming
        if self.path == "/image.png":
            self._send(200, self.image, {"Content-Length": str(len(self.image))})
        elif self.path == "/chunked-big":
            self.send_response(200)
            self.end_headers()
            for _ in range(64):  # no Content-Length: the limit must hold while streaming
                self.wfile.write(b"\0" * 4096)
        elif self.path == "/slow":
            time.sleep(3)
            self._send(200, self.image, {})
        elif self.path.startswith("/redirect-to/"):
            target = self.path[len("/redirect-to/") :]
            location = target if target.startswith("http") else "/" + target
            self._send(302, b"", {"Location": location})
        elif self.path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        else:
            self._send(404, b"", {})

    def _send(self, status, body, headers):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def image_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _loopback_loader(**overrides) -> ImageLoader:
    # The operator's allow-list is the only way to reach a loopback test server
    config = dict(allow_http=True, allowed_networks=("127.0.0.1/32",), fetch_timeout_s=2.0)
    return ImageLoader(ImageFetchConfig(**{**config, **overrides}))


def test_fetch_from_allowed_network(image_server):
    assert load(_loopback_loader(), f"{image_server}/image.png") == _Handler.image


def test_fetch_limits_bytes_while_streaming(image_server):
    with pytest.raises(ImageTooLargeError):
        load(_loopback_loader(max_image_bytes=10_000), f"{image_server}/chunked-big")


def test_fetch_times_out(image_server):
    start = time.monotonic()
    with pytest.raises(ImageInputError, match="longer than"):
        load(_loopback_loader(fetch_timeout_s=0.5), f"{image_server}/slow")
    assert time.monotonic() - start < 2.5


def test_redirect_is_followed_and_each_hop_is_checked(image_server):
    assert load(_loopback_loader(), f"{image_server}/redirect-to/image.png") == _Handler.image
    with pytest.raises(ImageInputError, match="non-public address"):
        load(_loopback_loader(), f"{image_server}/redirect-to/http://127.0.0.2:1/x.png")
    with pytest.raises(ImageInputError, match="redirects"):
        load(_loopback_loader(max_redirects=2), f"{image_server}/loop")


def test_http_error_status_is_reported(image_server):
    with pytest.raises(ImageInputError, match="HTTP 404"):
        load(_loopback_loader(), f"{image_server}/missing.png")


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


# -- SSRF: every spelling of a private address, and names that resolve to one ----------------


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("2002:c0a8:101::", False),  # 6to4 of 192.168.1.1
        ("::127.0.0.1", False),  # IPv4-compatible
        ("::ffff:0:7f00:1", False),  # IPv4-translated
        ("::ffff:10.0.0.1", False),
        ("fec0::1", False),  # site-local
        ("fc00::1", False),
    ],
)
def test_address_policy_sees_ipv4_inside_ipv6(address, allowed):
    import ipaddress

    assert is_address_allowed(ipaddress.ip_address(address)) is allowed


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/a.png",  # decimal 127.0.0.1
        "http://0x7f000001/a.png",  # hexadecimal
        "http://0177.0.0.1/a.png",  # octal
        "http://127.1/a.png",  # short form
        "http://[::ffff:7f00:1]/a.png",
        "http://[0:0:0:0:0:ffff:127.0.0.1]/a.png",
        "http://[fd12:3456::1]/a.png",
        "http://[64:ff9b::a00:1]/a.png",
        "http://[2002:c0a8:101::]:8080/a.png",
        "http://167772161/a.png",  # decimal 10.0.0.1
    ],
)
def test_numeric_spellings_of_private_addresses_are_refused(url):
    loader = ImageLoader(ImageFetchConfig(allow_http=True))
    with pytest.raises(ImageInputError, match="non-public address"):
        load(loader, url)


class _StubResolver:
    """Answers from a table, counting lookups; an entry may be a list of answers, one per call
    (a name whose DNS answer changes: rebinding)."""

    def __init__(self, table: dict[str, list]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        answers = self.table[host]
        if answers and isinstance(answers[0], list):
            return answers[min(len(self.calls) - 1, len(answers) - 1)]
        return answers


class _RecordingHandler(_Handler):
    hosts: list[str] = []

    def do_GET(self):  # noqa: N802 - the stdlib's naming
        type(self).hosts.append(self.headers.get("Host", ""))
        super().do_GET()


@pytest.fixture
def recording_server() -> Iterator[int]:
    _RecordingHandler.hosts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize(
    "answers", [["10.0.0.7"], ["127.0.0.1"], ["8.8.8.8", "192.168.0.1"], ["fd00::1"]]
)
def test_names_resolving_to_private_addresses_are_refused(answers):
    resolver = _StubResolver({"images.example": answers})
    loader = ImageLoader(ImageFetchConfig(allow_http=True), resolver=resolver)
    with pytest.raises(ImageInputError, match="non-public address"):
        load(loader, "http://images.example/cat.png")
    assert resolver.calls == ["images.example"]


def test_the_connection_goes_to_the_checked_address(recording_server):
    # The first answer is the (allowed) test server; any later lookup would rebind to a
    # private address. One lookup per hop, and the request reaches the checked address.
    port = recording_server
    resolver = _StubResolver({"images.example": [["127.0.0.1"], ["10.0.0.1"]]})
    config = ImageFetchConfig(allow_http=True, allowed_networks=("127.0.0.1/32",))
    loader = ImageLoader(config, resolver=resolver)
    assert load(loader, f"http://images.example:{port}/image.png") == _Handler.image
    assert resolver.calls == ["images.example"]
    assert _RecordingHandler.hosts == [f"images.example:{port}"]  # the name, as sent


def test_a_redirect_to_a_name_of_a_private_address_is_refused(recording_server):
    port = recording_server
    resolver = _StubResolver({"images.example": ["127.0.0.1"], "internal.example": ["10.1.1.1"]})
    config = ImageFetchConfig(allow_http=True, allowed_networks=("127.0.0.1/32",))
    loader = ImageLoader(config, resolver=resolver)
    url = f"http://images.example:{port}/redirect-to/http://internal.example/secret.png"
    with pytest.raises(ImageInputError, match="non-public address"):
        load(loader, url)
    assert resolver.calls == ["images.example", "internal.example"]
    # and one to a loopback address outside the allowed network, spelled in decimal
    url = f"http://images.example:{port}/redirect-to/http://2130706434:{port}/image.png"
    with pytest.raises(ImageInputError, match="non-public address"):
        load(ImageLoader(config), url.replace("images.example", "127.0.0.1"))
