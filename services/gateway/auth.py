"""Vendor identity from `authorization: Bearer <key>` metadata, checked by one interceptor.

Keys come from the vendor registry in Redis (services/gateway/vendors.py,
`cutout-admin vendors ...`) and, for the local cluster and simple setups, from
CUTOUT_API_KEYS="vendor:sha256hex,...". Both hold SHA-256 hashes only, so
neither the configuration, Redis nor a log line ever holds a usable key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import grpc
import redis.asyncio as aioredis

from services.common.errors import CutoutError
from services.common.identity import VENDOR_ID, set_vendor
from services.common.interceptors import Context, Handler, HandlerInterceptor, around

if TYPE_CHECKING:
    from services.gateway.ratelimit import Quota
    from services.gateway.vendors import Vendor, VendorRegistry

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "ck_" + secrets.token_urlsafe(32)


def parse_key_entries(entries: Iterable[str]) -> dict[str, str]:
    """["vendor:sha256hex", ...] -> {sha256hex: vendor}; errors name the bad entry's position."""
    table: dict[str, str] = {}
    for i, entry in enumerate(entries):
        vendor, _, digest = entry.partition(":")
        if not VENDOR_ID.match(vendor) or not _HEX64.match(digest):
            raise ValueError(
                f"CUTOUT_API_KEYS entry {i + 1} is not 'vendor:<64 hex sha256 of the key>'"
            )
        table[digest] = vendor
    return table


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    """The key in `authorization: Bearer <key>`, or UNAUTHENTICATED saying what to send."""
    header = ""
    for key, value in metadata:
        if key == "authorization":
            header = value if isinstance(value, str) else value.decode(errors="replace")
            break
    scheme, _, token = header.partition(" ")
    if not header:
        raise CutoutError(
            "missing credentials: send metadata 'authorization: Bearer <api key>'",
            grpc.StatusCode.UNAUTHENTICATED,
        )
    if scheme.lower() != "bearer" or not token.strip():
        raise CutoutError(
            "malformed authorization metadata: expected 'Bearer <api key>'",
            grpc.StatusCode.UNAUTHENTICATED,
        )
    return token.strip()


class KeyTable:
    """Static keys from CUTOUT_API_KEYS: {sha256 hex: vendor}."""

    def __init__(self, by_hash: dict[str, str]) -> None:
        self.by_hash = by_hash

    def vendor_for(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        vendor = self.by_hash.get(hash_key(bearer_token(metadata)))
        if vendor is None:
            raise CutoutError("unknown or revoked API key", grpc.StatusCode.UNAUTHENTICATED)
        return vendor


class Authenticator:
    """Static keys first, then the registry; registry answers cached for cache_s.

    The cache bounds Redis traffic (one lookup per key per cache_s, also for
    wrong keys) and is why a disabled vendor or a revoked key stops working
    within cache_s, not instantly.
    """

    def __init__(
        self, static: KeyTable, registry: VendorRegistry | None, cache_s: float = 2.0
    ) -> None:
        self.static = static
        self.registry = registry
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, Vendor | None]] = {}
        self._limits: dict[str, dict[str, Quota]] = {}

    async def vendor_for(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        digest = hash_key(bearer_token(metadata))
        vendor = self.static.by_hash.get(digest)
        if vendor is not None:
            return vendor
        found = await self._lookup(digest)
        if found is None:
            raise CutoutError("unknown or revoked API key", grpc.StatusCode.UNAUTHENTICATED)
        if not found.active:
            raise CutoutError(
                f"vendor {found.id} is disabled; ask the operator to enable it",
                grpc.StatusCode.PERMISSION_DENIED,
            )
        self._limits[found.id] = found.limits
        return found.id

    def limits_of(self, vendor: str) -> dict[str, Quota]:
        """The vendor's own rate limits from the registry (empty: the gateway's defaults)."""
        return self._limits.get(vendor, {})

    async def _lookup(self, digest: str) -> Vendor | None:
        if self.registry is None:
            return None
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and now - hit[0] < self.cache_s:
            return hit[1]
        found = await self.registry.lookup(digest)
        if len(self._cache) > 10_000:  # wrong keys must not grow it without bound
            self._cache.clear()
        self._cache[digest] = (now, found)
        return found


class VendorAuth(HandlerInterceptor):
    """Authenticates every public call and sets its vendor (services/common/identity.py).

    Handlers, the gateway's own and the relayed ones, then read the vendor
    with `current_vendor()`; none repeats the check. A refusal is a
    CutoutError for the ErrorMapping interceptor outside this one.
    """

    def __init__(self, keys: Authenticator) -> None:
        self.keys = keys

    def wrap(self, handler: Handler, method: str) -> Handler:
        async def authenticate(context: Context) -> None:
            try:
                vendor = await self.keys.vendor_for(context.invocation_metadata() or ())
            except aioredis.RedisError as exc:
                raise CutoutError(
                    f"vendor registry unavailable, retry shortly: {exc}",
                    grpc.StatusCode.UNAVAILABLE,
                    retry_after_s=1.0,
                ) from exc
            set_vendor(vendor)

        return around(handler, authenticate)
