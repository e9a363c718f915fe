"""Fetching an image by URL without server-side request forgery.

The host is resolved once; every address it resolves to must be public
(IPv4-mapped, IPv4-compatible, NAT64 and 6to4 IPv6 forms are unwrapped to
the IPv4 inside first), and the connection then goes to those very
addresses, so a DNS answer that changes between the check and the connect
cannot redirect it. Each redirect (at most 3) is checked the same way. Only
https by default; size and time are capped. Hosts on an operator allow-list
skip the address check (that is how the tests reach their loopback server).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import aiohttp
import grpc
from aiohttp.abc import AbstractResolver, ResolveResult

from services.common.errors import CutoutError, FieldViolation

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str, int], Awaitable[list[str]]]

NAT64 = ipaddress.ip_network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
SIXTO4 = ipaddress.ip_network("2002::/16")
# Cloud metadata endpoints that are not covered by the private/link-local ranges.
METADATA = [
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS IPv6 (also private)
]
REDIRECTS = {301, 302, 303, 307, 308}


@dataclass(frozen=True)
class FetchPolicy:
    """
    Attributes:
        max_bytes: largest body accepted.
        timeout_s: whole fetch, redirects included.
        max_redirects: redirects followed.
        allow_http: also fetch http:// URLs (off by default).
        allow_hosts: host names or literal IPs exempt from the address check.
    """

    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    max_redirects: int = 3
    allow_http: bool = False
    allow_hosts: frozenset[str] = field(default_factory=frozenset)


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64, 6to4)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64 or ip in NAT64_LOCAL:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if int(ip) >> 32 == 0 and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(ip))
    return None


def forbidden(ip: IPAddress) -> str | None:
    """Why an address must not be fetched from, or None if it is public."""
    inner = embedded_ipv4(ip)
    if inner is not None:
        why = forbidden(inner)
        return f"{why} (inside {ip})" if why else None
    for net in METADATA:
        if ip in net:
            return f"{ip} is a cloud metadata address"
    checks = [
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local (cloud metadata lives here)"),
        (ip.is_multicast, "multicast"),
        (ip.is_unspecified, "unspecified"),
        (ip.is_reserved, "reserved"),
        (ip.is_private, "private"),
        (not ip.is_global, "not globally routable"),
    ]
    for hit, label in checks:
        if hit:
            return f"{ip} is {label}"
    return None


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _Pinned(AbstractResolver):
    """Hands aiohttp the addresses already checked, and nothing else."""

    def __init__(self, host: str, addresses: list[IPAddress]) -> None:
        self.host = host
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != self.host:
            raise OSError(f"unexpected host {host!r}")
        return [
            ResolveResult(
                hostname=host,
                host=str(ip),
                port=port,
                family=socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in self.addresses
        ]

    async def close(self) -> None:
        return None


class Fetcher:
    def __init__(self, policy: FetchPolicy, resolve: Resolve = system_resolve) -> None:
        self.policy = policy
        self._resolve = resolve

    def _refuse(self, field_path: str, url: str, why: str) -> CutoutError:
        description = f"cannot fetch {url!r}: {why}"
        return CutoutError(
            f"{field_path}: {description}",
            grpc.StatusCode.INVALID_ARGUMENT,
            [FieldViolation(field_path, description)],
        )

    async def check(self, url: str, field_path: str) -> tuple[str, int, list[IPAddress]]:
        """(host, port, addresses to connect to) or an INVALID_ARGUMENT saying why not."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise self._refuse(field_path, url, f"not a valid URL ({exc})") from None
        schemes = ("https", "http") if self.policy.allow_http else ("https",)
        if parts.scheme not in schemes:
            raise self._refuse(field_path, url, f"only {' and '.join(schemes)} URLs are fetched")
        if parts.username is not None or parts.password is not None:
            raise self._refuse(field_path, url, "credentials in URLs are not accepted")
        host = parts.hostname
        if not host:
            raise self._refuse(field_path, url, "the URL has no host")
        port = port or (443 if parts.scheme == "https" else 80)
        try:
            found = await self._resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise self._refuse(field_path, url, f"host {host!r} does not resolve ({exc})") from None
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in found]
        if not addresses:
            raise self._refuse(field_path, url, f"host {host!r} has no address")
        if host not in self.policy.allow_hosts:
            for ip in addresses:
                why = forbidden(ip)
                if why:
                    raise self._refuse(field_path, url, f"host {host!r} resolves to {why}; refused")
        return host, port, addresses

    async def fetch(self, url: str, field_path: str) -> bytes:
        """The body at url, following up to max_redirects checked redirects."""
        try:
            return await asyncio.wait_for(self._fetch(url, field_path), self.policy.timeout_s)
        except TimeoutError:
            raise self._refuse(
                field_path, url, f"no complete answer within {self.policy.timeout_s:g} s"
            ) from None

    async def _fetch(self, url: str, field_path: str) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            host, _port, addresses = await self.check(url, field_path)
            connector = aiohttp.TCPConnector(
                resolver=_Pinned(host, addresses), use_dns_cache=False, force_close=True
            )
            async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
                try:
                    async with session.get(
                        url, allow_redirects=False, headers={"accept": "image/*"}
                    ) as response:
                        if response.status in REDIRECTS:
                            location = response.headers.get("location", "")
                            if not location:
                                raise self._refuse(field_path, url, "redirect without a location")
                            url = urljoin(url, location)
                            continue
                        if response.status != 200:
                            raise self._refuse(
                                field_path, url, f"the server answered HTTP {response.status}"
                            )
                        return await self._read(response, url, field_path)
                except aiohttp.ClientError as exc:
                    raise self._refuse(field_path, url, f"connection failed ({exc})") from None
        raise self._refuse(field_path, url, f"more than {self.policy.max_redirects} redirects")

    async def _read(self, response: aiohttp.ClientResponse, url: str, field_path: str) -> bytes:
        limit = self.policy.max_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            raise self._refuse(field_path, url, f"body is {declared} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in response.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                raise self._refuse(field_path, url, f"body exceeds the limit of {limit} bytes")
        return bytes(body)
