"""Fetching an http(s) URL on behalf of a client, safely: the one fetcher both services use.

Fetching URLs for clients is a server-side request forgery risk, so every hop (redirects
included) is resolved first and refused if any address is not globally routable (loopback,
private, link-local such as cloud metadata at 169.254.169.254, ...), unless it lies in a network
the operator allowed. The connection then goes to the address that was checked, so a DNS answer
that changes between the check and the connect (DNS rebinding) cannot redirect it. Byte, time
and redirect limits bound what one fetch can cost.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_MAX_URL_IN_MESSAGE = 80

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> the addresses the host resolves to, as strings
Resolver = Callable[[str, int], Awaitable[list[str]]]


class FetchError(ValueError):
    """The URL cannot be fetched (refused address, HTTP error, timeout); the message says why."""


class FetchTooLargeError(FetchError):
    """The response is larger than the byte limit."""


async def system_resolver(host: str, port: int) -> list[str]:
    """The system's resolver (getaddrinfo, off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def short_url(url: str) -> str:
    """A URL cut for an error message."""
    return url if len(url) <= _MAX_URL_IN_MESSAGE else url[:_MAX_URL_IN_MESSAGE] + "..."


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


def parse_networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """CIDR strings -> networks; ValueError naming the entry that is not one."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr, strict=False))
        except ValueError as exc:
            raise ValueError(f"{cidr!r} is not a CIDR network: {exc}") from None
    return tuple(networks)


@dataclass(frozen=True)
class FetchPolicy:
    """Limits and the networks exempt from the public-address rule (empty by default, for
    operators whose image store lives on a private network)."""

    max_bytes: int = 20 * 2**20
    timeout_s: float = 10.0
    max_redirects: int = 3
    allowed_networks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.timeout_s <= 0 or self.max_redirects < 0:
            raise ValueError("max_bytes and timeout_s must be positive, max_redirects >= 0")
        parse_networks(self.allowed_networks)


class SafeFetcher:
    """Fetches http(s) URLs under a `FetchPolicy`. `resolver` replaces the system's (tests stub
    it to give names private or changing answers)."""

    def __init__(self, policy: FetchPolicy, resolver: Resolver = system_resolver) -> None:
        self.policy = policy
        self._resolver = resolver
        self._allowed = parse_networks(policy.allowed_networks)

    async def fetch(self, url: str) -> bytes:
        """The body behind `url`; FetchError or FetchTooLargeError otherwise."""
        timeout = self.policy.timeout_s
        try:
            async with asyncio.timeout(timeout):
                async with httpx.AsyncClient(
                    follow_redirects=False, trust_env=False, timeout=timeout
                ) as client:
                    return await self._follow_redirects(client, url)
        except TimeoutError as exc:
            raise FetchError(f"fetching {short_url(url)!r} took longer than {timeout} s") from exc
        except httpx.HTTPError as exc:
            raise FetchError(f"fetching {short_url(url)!r} failed: {type(exc).__name__}") from exc

    async def _follow_redirects(self, client: httpx.AsyncClient, url: str) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            target, headers, extensions = await self._pinned_request(url)
            request = client.build_request("GET", target, headers=headers, extensions=extensions)
            response = await client.send(request, stream=True)
            try:
                if response.status_code in _REDIRECT_STATUSES and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise FetchError(
                        f"fetching {short_url(url)!r} returned HTTP {response.status_code}"
                    )
                return await self._read_limited(response)
            finally:
                await response.aclose()
        raise FetchError(f"more than {self.policy.max_redirects} redirects for {short_url(url)!r}")

    async def _pinned_request(self, url: str) -> tuple[str, dict[str, str], dict[str, str]]:
        """Resolve and vet the host; return a URL that targets the vetted address directly."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"URL {short_url(url)!r} is not an absolute http(s) URL")
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
            raise FetchError(f"cannot resolve host {short_url(host)!r}") from exc
        try:
            addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in answers]
        except ValueError as exc:
            raise FetchError(f"host {short_url(host)!r} resolved to a bad address") from exc
        # One disallowed answer refuses the host: the resolver may hand that one out next time
        if not addresses or not all(is_address_allowed(a, self._allowed) for a in addresses):
            raise FetchError(
                f"host {host!r} resolves to a loopback, private or otherwise non-public "
                "address; such URLs are refused"
            )
        return addresses[0]

    async def _read_limited(self, response: httpx.Response) -> bytes:
        limit = self.policy.max_bytes
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise FetchTooLargeError(
                f"the response is {declared} bytes, above the limit of {limit}"
            )
        chunks, total = [], 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > limit:
                raise FetchTooLargeError(f"the response is over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
