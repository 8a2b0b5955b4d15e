"""The public-address fetcher both services use: the SSRF guard (every spelling of a private
address, names that resolve to one, DNS rebinding, redirects) and the byte, time and redirect
limits."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared.wire.fetch import (
    FetchError,
    FetchPolicy,
    FetchTooLargeError,
    SafeFetcher,
    is_address_allowed,
    parse_networks,
)


def fetch(fetcher: SafeFetcher, url: str) -> bytes:
    return asyncio.run(fetcher.fetch(url))


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
    fetcher = SafeFetcher(FetchPolicy())
    with pytest.raises(FetchError, match="non-public address"):
        fetch(fetcher, url)


class _Handler(BaseHTTPRequestHandler):
    image = b"\x89PNG pretend image bytes" * 16

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


def _loopback_fetcher(**overrides) -> SafeFetcher:
    # The operator's allow-list is the only way to reach a loopback test server
    policy = dict(allowed_networks=("127.0.0.1/32",), timeout_s=2.0)
    return SafeFetcher(FetchPolicy(**{**policy, **overrides}))


def test_fetch_from_allowed_network(image_server):
    assert fetch(_loopback_fetcher(), f"{image_server}/image.png") == _Handler.image


def test_fetch_limits_bytes_while_streaming(image_server):
    with pytest.raises(FetchTooLargeError):
        fetch(_loopback_fetcher(max_bytes=10_000), f"{image_server}/chunked-big")


def test_fetch_times_out(image_server):
    start = time.monotonic()
    with pytest.raises(FetchError, match="longer than"):
        fetch(_loopback_fetcher(timeout_s=0.5), f"{image_server}/slow")
    assert time.monotonic() - start < 2.5


def test_redirect_is_followed_and_each_hop_is_checked(image_server):
    assert fetch(_loopback_fetcher(), f"{image_server}/redirect-to/image.png") == _Handler.image
    with pytest.raises(FetchError, match="non-public address"):
        fetch(_loopback_fetcher(), f"{image_server}/redirect-to/http://127.0.0.2:1/x.png")
    with pytest.raises(FetchError, match="redirects"):
        fetch(_loopback_fetcher(max_redirects=2), f"{image_server}/loop")


def test_http_error_status_is_reported(image_server):
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(_loopback_fetcher(), f"{image_server}/missing.png")


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
    fetcher = SafeFetcher(FetchPolicy())
    with pytest.raises(FetchError, match="non-public address"):
        fetch(fetcher, url)


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
    fetcher = SafeFetcher(FetchPolicy(), resolver=resolver)
    with pytest.raises(FetchError, match="non-public address"):
        fetch(fetcher, "http://images.example/cat.png")
    assert resolver.calls == ["images.example"]


def test_the_connection_goes_to_the_checked_address(recording_server):
    # The first answer is the (allowed) test server; any later lookup would rebind to a
    # private address. One lookup per hop, and the request reaches the checked address.
    port = recording_server
    resolver = _StubResolver({"images.example": [["127.0.0.1"], ["10.0.0.1"]]})
    policy = FetchPolicy(allowed_networks=("127.0.0.1/32",))
    fetcher = SafeFetcher(policy, resolver=resolver)
    assert fetch(fetcher, f"http://images.example:{port}/image.png") == _Handler.image
    assert resolver.calls == ["images.example"]
    assert _RecordingHandler.hosts == [f"images.example:{port}"]  # the name, as sent


def test_a_redirect_to_a_name_of_a_private_address_is_refused(recording_server):
    port = recording_server
    resolver = _StubResolver({"images.example": ["127.0.0.1"], "internal.example": ["10.1.1.1"]})
    policy = FetchPolicy(allowed_networks=("127.0.0.1/32",))
    fetcher = SafeFetcher(policy, resolver=resolver)
    url = f"http://images.example:{port}/redirect-to/http://internal.example/secret.png"
    with pytest.raises(FetchError, match="non-public address"):
        fetch(fetcher, url)
    assert resolver.calls == ["images.example", "internal.example"]
    # and one to a loopback address outside the allowed network, spelled in decimal
    url = f"http://images.example:{port}/redirect-to/http://2130706434:{port}/image.png"
    with pytest.raises(FetchError, match="non-public address"):
        fetch(SafeFetcher(policy), url.replace("images.example", "127.0.0.1"))


def test_policy_validation():
    with pytest.raises(ValueError, match="CIDR"):
        FetchPolicy(allowed_networks=("not-a-network",))
    with pytest.raises(ValueError, match="positive"):
        FetchPolicy(timeout_s=0)
    assert parse_networks(("10.0.0.0/8",)) == (ipaddress.ip_network("10.0.0.0/8"),)
