"""Fetching an image by URL without server-side request forgery.

The host is resolved once; every address it resolves to must be public
(IPv4-mapped, IPv4-compatible, NAT64 and 6to4 IPv6 forms are unwrapped to
the IPv4 inside first), and the connection then goes to those very
addresses, so a DNS answer that changes between the check and the connect
cannot redirect it. Each redirect (at most 3) is checked the same way. Only
https by default; size and time are capped. Host-and-port pairs on an operator
allow-list skip the address check (that is how the tests reach their loopback
server); the pair, not the host: an allowed internal image server must not open
every other port of its machine (its Redis, its admin API) to whoever submits a URL.

Fetches take slots (`FetchSlots`): a few per vendor, more for the whole
gateway, so one vendor's slow URLs cannot hold the fetchers every other
vendor needs. Waiting for a gateway slot counts against the fetch's own
deadline, and a refusal for want of a slot is RESOURCE_EXHAUSTED with RetryInfo.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
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
# Cloud metadata endpoints that are not covered by the private/link-local ranges.
METADATA = [
    ipaddress.ip_network("100.100.100.200/32"),  # Alibaba Cloud
    ipaddress.ip_network("fd00:ec2::254/128"),  # AWS IPv6 (also private)
]
REDIRECTS = {301, 302, 303, 307, 308}
DEFAULT_PORTS = {"https": 443, "http": 80}


def _normal_host(host: str) -> str:
    """One spelling per host: IPs in their compressed form, names in lower case."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


@dataclass(frozen=True)
class AllowedHost:
    """One allow-list entry: URLs to this host on this port skip the address check.

    Attributes:
        host: a host name or a literal IP, as `_normal_host` spells it.
        port: the one port allowed; None: the scheme's default (443 for https, 80 for http).
        scheme: "https" or "http"; None: either (each on its own default port if no port).
    """

    host: str
    port: int | None = None
    scheme: str | None = None

    @classmethod
    def parse(cls, entry: str) -> AllowedHost:
        """`host`, `host:port`, `[v6]:port`, `scheme://host` or `scheme://host:port`.

        Raises ValueError saying what is wrong with the entry.
        """
        scheme, sep, rest = entry.strip().rpartition("://")
        if sep and scheme.lower() not in DEFAULT_PORTS:
            raise ValueError(f"{entry!r}: the scheme must be https or http")
        if ":" in rest and "[" not in rest and rest.count(":") > 1:  # a bare IPv6 address
            rest = f"[{rest}]"
        parts = urlsplit("//" + rest)
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port == 0:
            raise ValueError(f"{entry!r}: the port must be a number 1-65535")
        extra = parts.path or parts.query or parts.fragment or parts.username is not None
        if not parts.hostname or extra:
            raise ValueError(f"{entry!r}: expected host:port, or scheme://host:port")
        return cls(_normal_host(parts.hostname), port, scheme.lower() if sep else None)

    def allows(self, scheme: str, host: str, port: int) -> bool:
        if self.scheme is not None and scheme != self.scheme:
            return False
        return host == self.host and port == (self.port or DEFAULT_PORTS[scheme])

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        ports = self.port or " or ".join(
            f"{port} ({scheme})"
            for scheme, port in DEFAULT_PORTS.items()
            if self.scheme in (None, scheme)
        )
        return f"{self.scheme + '://' if self.scheme else ''}{host} on port {ports}"


@dataclass(frozen=True)
class FetchPolicy:
    """
    Attributes:
        max_bytes: largest body accepted.
        timeout_s: whole fetch, redirects included.
        max_redirects: redirects followed.
        allow_http: also fetch http:// URLs (off by default).
        allow_hosts: (scheme,) host and port combinations exempt from the address check.
        fetches_per_vendor: fetches one vendor may have running at once.
        fetches: fetches the whole gateway runs at once.
    """

    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    max_redirects: int = 3
    allow_http: bool = False
    allow_hosts: frozenset[AllowedHost] = field(default_factory=frozenset)
    # 64 slow URLs from one vendor once held all 16 of a gateway's fetchers and made
    # every other vendor's URL submit wait past its deadline; 4 each keeps any
    # vendor to a quarter of them.
    fetches_per_vendor: int = 4
    fetches: int = 16

    def allowed(self, scheme: str, host: str, port: int) -> bool:
        return any(entry.allows(scheme, host, port) for entry in self.allow_hosts)


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


class Pinned(AbstractResolver):
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


RETRY_SLOT_S = 1.0  # what a refusal for want of a fetch slot tells the caller to wait


class FetchSlots:
    """Who may fetch now: `per_vendor` fetches of one vendor, `total` in the gateway."""

    def __init__(self, per_vendor: int, total: int) -> None:
        self.per_vendor = per_vendor
        self.total = total
        self._shared = asyncio.Semaphore(total)
        self._vendors: dict[str, asyncio.Semaphore] = {}
        self._holders: dict[str, int] = {}  # vendor -> slots held or waited for

    @contextlib.asynccontextmanager
    async def vendor(self, vendor: str, wait: bool = False) -> AsyncIterator[None]:
        """One of the vendor's slots. Without `wait`, RESOURCE_EXHAUSTED at once when the
        vendor has them all; with it (a batch's items), wait for one of its own."""
        mine = self._vendors.setdefault(vendor, asyncio.Semaphore(self.per_vendor))
        if not wait and mine.locked():
            raise _busy(
                f"vendor {vendor} already has {self.per_vendor} URL fetches running on this "
                "gateway, the most CUTOUT_URL_FETCHES_PER_VENDOR allows; retry shortly, or "
                "send the image bytes inline"
            )
        self._holders[vendor] = self._holders.get(vendor, 0) + 1
        try:
            async with mine:
                yield
        finally:
            self._holders[vendor] -= 1
            if not self._holders[vendor]:  # forget idle vendors: the map must not grow
                del self._holders[vendor], self._vendors[vendor]

    @contextlib.asynccontextmanager
    async def shared(self, wait_s: float) -> AsyncIterator[None]:
        """One of the gateway's slots, waited for at most wait_s (the fetch's deadline)."""
        try:
            await asyncio.wait_for(self._shared.acquire(), max(0.0, wait_s))
        except TimeoutError:
            raise _busy(
                f"all {self.total} URL fetchers of this gateway (CUTOUT_URL_FETCHES) stayed "
                "busy until this fetch's deadline; retry shortly, or send the image bytes inline"
            ) from None
        try:
            yield
        finally:
            self._shared.release()


def _busy(message: str) -> CutoutError:
    return CutoutError(message, grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after_s=RETRY_SLOT_S)


class Fetcher:
    def __init__(self, policy: FetchPolicy, resolve: Resolve = system_resolve) -> None:
        self.policy = policy
        self._resolve = resolve
        self.slots = FetchSlots(policy.fetches_per_vendor, policy.fetches)

    def refuse(self, field_path: str, url: str, why: str) -> CutoutError:
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
            raise self.refuse(field_path, url, f"not a valid URL ({exc})") from None
        schemes = ("https", "http") if self.policy.allow_http else ("https",)
        if parts.scheme not in schemes:
            raise self.refuse(field_path, url, f"only {' and '.join(schemes)} URLs are fetched")
        if parts.username is not None or parts.password is not None:
            raise self.refuse(field_path, url, "credentials in URLs are not accepted")
        host = parts.hostname
        if not host:
            raise self.refuse(field_path, url, "the URL has no host")
        port = port or (443 if parts.scheme == "https" else 80)
        try:
            found = await self._resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise self.refuse(field_path, url, f"host {host!r} does not resolve ({exc})") from None
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in found]
        if not addresses:
            raise self.refuse(field_path, url, f"host {host!r} has no address")
        if not self.policy.allowed(parts.scheme, _normal_host(host), port):
            for ip in addresses:
                why = forbidden(ip)
                if why:
                    why = f"host {host!r} resolves to {why}; refused"
                    raise self.refuse(field_path, url, why + self._allowed_only(host))
        return host, port, addresses

    def _allowed_only(self, host: str) -> str:
        """Where the allow-list does let this host through, for a refusal's message."""
        entries = sorted(str(a) for a in self.policy.allow_hosts if a.host == _normal_host(host))
        return f" (the allow-list has it only as {', '.join(entries)})" if entries else ""

    async def fetch(self, url: str, field_path: str, timeout_s: float | None = None) -> bytes:
        """The body at url, following up to max_redirects checked redirects, within
        timeout_s (default: the policy's; less when a slot was waited for)."""
        limit = self.policy.timeout_s if timeout_s is None else max(0.0, timeout_s)
        try:
            return await asyncio.wait_for(self._fetch(url, field_path), limit)
        except TimeoutError:
            raise self.refuse(
                field_path, url, f"no complete answer within {self.policy.timeout_s:g} s"
            ) from None

    async def _fetch(self, url: str, field_path: str) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            host, _port, addresses = await self.check(url, field_path)
            connector = aiohttp.TCPConnector(
                resolver=Pinned(host, addresses), use_dns_cache=False, force_close=True
            )
            async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
                try:
                    async with session.get(
                        url, allow_redirects=False, headers={"accept": "image/*"}
                    ) as response:
                        if response.status in REDIRECTS:
                            location = response.headers.get("location", "")
                            if not location:
                                raise self.refuse(field_path, url, "redirect without a location")
                            url = urljoin(url, location)
                            continue
                        if response.status != 200:
                            raise self.refuse(
                                field_path, url, f"the server answered HTTP {response.status}"
                            )
                        return await self._read(response, url, field_path)
                except aiohttp.ClientError as exc:
                    raise self.refuse(field_path, url, f"connection failed ({exc})") from None
        raise self.refuse(field_path, url, f"more than {self.policy.max_redirects} redirects")

    async def _read(self, response: aiohttp.ClientResponse, url: str, field_path: str) -> bytes:
        limit = self.policy.max_bytes
        declared = response.content_length
        if declared is not None and declared > limit:
            raise self.refuse(field_path, url, f"body is {declared} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in response.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                raise self.refuse(field_path, url, f"body exceeds the limit of {limit} bytes")
        return bytes(body)
