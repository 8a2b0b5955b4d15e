"""Loading the bytes of image parts: `data:` URLs, http(s) URLs when the operator enables them, and
`file://` URLs under one directory the operator names.

Fetching URLs on behalf of clients is a server-side request forgery risk, so http(s) fetching
is off by default and, when on, every hop (redirects included) is resolved first and refused if
any address is not globally routable (loopback, private, link-local such as cloud metadata at
169.254.169.254, ...). The connection then goes to the address that was checked, so a DNS answer
that changes between the check and the connect (DNS rebinding) cannot redirect it. Size and time
limits bound what one image can cost. A `file://` path is resolved (symlinks followed) before it
is checked, so neither `..` nor a link can reach outside the allowed directory.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from services.language.errors import ImageInputError, ImageTooLargeError
from shared.wire.dataurl import (
    DataURLError,
    DataURLTooLargeError,
    decode_base64_payload,
    split_data_url,
)

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_URL_IN_MESSAGE = 80
_INLINE_DECODE_CHARS = 256 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> the addresses the host resolves to, as strings
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    """The system's resolver (getaddrinfo, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


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
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects must be >= 0, got {self.max_redirects}")
        for cidr in self.allowed_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"allowed_networks entry {cidr!r} is not a CIDR: {exc}") from exc


def _short(url: str) -> str:
    return url if len(url) <= _MAX_URL_IN_MESSAGE else url[:_MAX_URL_IN_MESSAGE] + "..."


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """Return the bytes of a base64 `data:image/...` URL, checking the size before decoding."""
    try:
        parsed = split_data_url(url)
    except DataURLError as exc:
        raise ImageInputError(str(exc)) from exc
    if parsed.mime and not parsed.mime.startswith("image/"):
        raise ImageInputError(f"data URL media type {parsed.mime!r} is not an image type (image/*)")
    if not parsed.is_base64:
        raise ImageInputError("data URL must be base64-encoded ('data:image/png;base64,...')")
    try:
        return decode_base64_payload(parsed.payload, max_bytes)
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


# IPv6 ranges that carry an IPv4 address in their last 32 bits and reach it through a
# translator (NAT64, RFC 6052 / 8215), judged by that IPv4 address.
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
# Deprecated or translated forms that Python calls global but nobody should fetch from: IPv4-
# compatible (::a.b.c.d), IPv4-translated (::ffff:0:a.b.c.d) and site-local (fec0::/10).
_REFUSED_V6 = tuple(ipaddress.ip_network(n) for n in ("::/96", "::ffff:0:0:0/96", "fec0::/10"))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to: mapped (::ffff:a.b.c.d), 6to4
    (2002:AABB:CCDD::) and NAT64 (64:ff9b::a.b.c.d)."""
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour) if a is not None]
    if any(ip in net for net in _NAT64):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found


def is_address_allowed(ip: IPAddress, allowed: tuple[IPNetwork, ...] = ()) -> bool:
    """True for globally routable unicast addresses, or addresses inside an allowed network.
    An IPv6 address that embeds an IPv4 one (::ffff:127.0.0.1, 6to4, NAT64) is judged by it."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if ip.ipv4_mapped is not None:
            return is_address_allowed(ip.ipv4_mapped, allowed)
        if embedded and not all(is_address_allowed(v4, allowed) for v4 in embedded):
            return False
    if any(ip.version == net.version and ip in net for net in allowed):
        return True
    if isinstance(ip, ipaddress.IPv6Address) and any(ip in net for net in _REFUSED_V6):
        return False
    return ip.is_global and not ip.is_multicast


class ImageLoader:
    """Turns an image part's URL into checked image bytes. `resolver` replaces the system's
    (tests stub it to give names private or changing answers)."""

    def __init__(self, config: ImageFetchConfig, resolver: Resolver = system_resolver) -> None:
        self.config = config
        self._resolver = resolver
        self._allowed = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in config.allowed_networks
        )
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
                data = await asyncio.to_thread(decode_data_url, url, self.config.max_image_bytes)
            else:
                data = decode_data_url(url, self.config.max_image_bytes)
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
                f"unsupported image URL scheme {scheme!r} in {_short(url)!r}; use a data: URL"
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
                f"{_short(url)!r} is not an absolute local file URL (file:///path/to/image.png)"
            )
        path = Path(unquote(parts.path)).resolve()
        if not path.is_relative_to(root):
            raise ImageInputError(
                f"image file {_short(url)!r} is outside the allowed directory {root}"
            )
        if not path.is_file():
            raise ImageInputError(f"image file {_short(url)!r} does not exist")
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
            async with asyncio.timeout(self.config.fetch_timeout_s):
                async with httpx.AsyncClient(
                    follow_redirects=False, trust_env=False, timeout=self.config.fetch_timeout_s
                ) as client:
                    return await self._fetch_following_redirects(client, url)
        except TimeoutError as exc:
            raise ImageInputError(
                f"fetching {_short(url)!r} took longer than {self.config.fetch_timeout_s} s"
            ) from exc
        except httpx.HTTPError as exc:
            raise ImageInputError(f"fetching {_short(url)!r} failed: {type(exc).__name__}") from exc

    async def _fetch_following_redirects(self, client: httpx.AsyncClient, url: str) -> bytes:
        for _ in range(self.config.max_redirects + 1):
            target, headers, extensions = await self._pinned_request(url)
            request = client.build_request("GET", target, headers=headers, extensions=extensions)
            response = await client.send(request, stream=True)
            try:
                if response.status_code in _REDIRECT_STATUSES and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise ImageInputError(
                        f"fetching {_short(url)!r} returned HTTP {response.status_code}"
                    )
                return await self._read_limited(response)
            finally:
                await response.aclose()
        raise ImageInputError(f"more than {self.config.max_redirects} redirects for image URL")

    async def _pinned_request(self, url: str) -> tuple[str, dict[str, str], dict[str, str]]:
        """Resolve and vet the host; return a URL that targets the vetted address directly."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageInputError(f"image URL {_short(url)!r} is not an absolute http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        ip = await self._resolve_allowed(parts.hostname, port)
        host_literal = f"[{ip}]" if ip.version == 6 else str(ip)
        target = parts._replace(netloc=f"{host_literal}:{port}").geturl()
        headers = {"Host": parts.netloc.rsplit("@", 1)[-1]}
        # TLS must still verify the certificate against the name the client gave, not the IP
        extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
        return target, headers, extensions

    async def _resolve_allowed(self, host: str, port: int) -> IPAddress:
        # Resolved once per hop; the connection goes to the address checked here
        try:
            answers = await self._resolver(host, port)
        except (socket.gaierror, UnicodeError) as exc:
            raise ImageInputError(f"cannot resolve image host {_short(host)!r}") from exc
        try:
            addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in answers]
        except ValueError as exc:
            raise ImageInputError(f"image host {_short(host)!r} resolved to a bad address") from exc
        # One disallowed answer refuses the host: the resolver may hand that one out next time
        if not addresses or not all(is_address_allowed(a, self._allowed) for a in addresses):
            raise ImageInputError(
                f"image host {host!r} resolves to a loopback, private or otherwise "
                "non-public address; such URLs are refused"
            )
        return addresses[0]

    async def _read_limited(self, response: httpx.Response) -> bytes:
        limit = self.config.max_image_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ImageTooLargeError(f"image is {declared} bytes, above the limit of {limit} bytes")
        chunks, total = [], 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > limit:
                raise ImageTooLargeError(f"image is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
