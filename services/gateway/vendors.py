"""The vendor registry: vendors, their hashed API keys, limits and weights, in Redis.

Managed with `cutout-admin vendors add|list|rotate|disable|enable` (operators, with
access to Redis); read by every gateway (keys, status, rate limits). A
vendor's fairness weight and cap on waiting jobs are its scheduling policy,
written through services/common/vendor_policy.py (in the same transaction as
the registry's own fields), which is all the scheduler reads. A key is
shown once, when it is made; Redis only ever holds its SHA-256.

Redis keys (under the cluster's prefix, default "cutout:"):
  vendor:{id}        HASH  status (active|disabled), limits ("name=N/S,..."),
                           created_ms, updated_ms
  vendor_policy:{id} HASH  weight, max_queued (0 = the cluster default): see vendor_policy.py
  registry:vendors   SET   every registered vendor id
  apikeys            HASH  sha256(key) -> vendor id
  apikeys:{id}       SET   the vendor's key hashes
  apikeys:expiry     HASH  sha256(key) -> ms since the epoch when a rotated-out key stops working
  webhook_endpoint:{id}, webhook_secrets:{id}: the vendor's webhook, see webhook_registry.py
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import cast

import redis.asyncio as aioredis

from services.common import vendor_policy, webhook_registry
from services.common.errors import InvalidArgument
from services.common.identity import ID_RULE, VENDOR_ID
from services.gateway.auth import hash_key, new_key
from services.gateway.ratelimit import Quota, parse_quota_overrides


class RegistryError(InvalidArgument):
    """A registry command that cannot be done as asked (unknown vendor, duplicate, bad value):
    the operator's arguments, so `cutout-admin` says why and asks again; never retried."""


@dataclass(frozen=True)
class Vendor:
    id: str
    active: bool = True
    weight: float = 1.0
    limits: dict[str, Quota] = field(default_factory=dict)
    max_queued: int = 0
    created_ms: int = 0
    keys: int = 0

    @property
    def limits_spec(self) -> str:
        return ",".join(f"{n}={q.limit}/{q.period_s}" for n, q in sorted(self.limits.items()))


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check(
    vendor_id: str, weight: float | None, limits: str | None, max_queued: int | None
) -> None:
    if not VENDOR_ID.match(vendor_id):
        raise RegistryError(f"vendor id {vendor_id!r}: use {ID_RULE}")
    if weight is not None and not 0.01 <= weight <= 1000:
        raise RegistryError(f"weight {weight}: use 0.01-1000")
    if limits:
        try:
            parse_quota_overrides(limits)
        except ValueError as exc:
            raise RegistryError(f"limits {limits!r}: {exc}") from exc
    if max_queued is not None and max_queued < 0:
        raise RegistryError("max_queued: use 0 (cluster default) or more")


class VendorRegistry:
    def __init__(self, redis: aioredis.Redis, prefix: str = "cutout:") -> None:
        self.redis = redis
        self.prefix = prefix
        self.ids = prefix + "registry:vendors"
        self.key_index = prefix + "apikeys"
        self.key_expiry = prefix + "apikeys:expiry"

    def _vendor(self, vendor_id: str) -> str:
        return f"{self.prefix}vendor:{vendor_id}"

    def _keys_of(self, vendor_id: str) -> str:
        return f"{self.prefix}apikeys:{vendor_id}"

    async def add(
        self, vendor_id: str, weight: float = 1.0, limits: str = "", max_queued: int = 0
    ) -> str:
        """Register a vendor; returns its first API key (shown once, stored hashed)."""
        _check(vendor_id, weight, limits, max_queued)
        now = _now_ms()
        if not await self.redis.hsetnx(self._vendor(vendor_id), "created_ms", now):
            raise RegistryError(f"vendor {vendor_id} already exists; use rotate for a new key")
        key = new_key()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self._vendor(vendor_id),
                mapping={"status": "active", "limits": limits, "updated_ms": now},
            )
            vendor_policy.write(pipe, self.prefix, vendor_id, weight, max_queued)
            pipe.sadd(self.ids, vendor_id)
            pipe.hset(self.key_index, hash_key(key), vendor_id)
            pipe.sadd(self._keys_of(vendor_id), hash_key(key))
            await pipe.execute()
        return key

    async def update(
        self,
        vendor_id: str,
        weight: float | None = None,
        limits: str | None = None,
        max_queued: int | None = None,
    ) -> Vendor:
        _check(vendor_id, weight, limits, max_queued)
        await self._require(vendor_id)
        changes: dict[str, str | int] = {"updated_ms": _now_ms()}
        if limits is not None:
            changes["limits"] = limits
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._vendor(vendor_id), mapping=changes)  # type: ignore[arg-type]
            vendor_policy.write(pipe, self.prefix, vendor_id, weight, max_queued)
            await pipe.execute()
        return await self.get(vendor_id)

    async def rotate(self, vendor_id: str, grace_s: int = 0) -> str:
        """A new key for the vendor; its old keys stop working after grace_s seconds."""
        if grace_s < 0:
            raise RegistryError("grace must be 0 or more seconds")
        await self._require(vendor_id)
        old = sorted(cast(set[bytes], await self.redis.smembers(self._keys_of(vendor_id))))
        expiries = await self.redis.hmget(self.key_expiry, old) if old else []
        key = new_key()
        deadline = _now_ms() + grace_s * 1000
        async with self.redis.pipeline(transaction=True) as pipe:
            for digest, expiry in zip(old, expiries, strict=True):
                if grace_s:
                    # A key already on its way out keeps its earlier deadline.
                    pipe.hset(self.key_expiry, digest, min(deadline, int(expiry or deadline)))
                else:
                    pipe.hdel(self.key_index, digest)
                    pipe.hdel(self.key_expiry, digest)
                    pipe.srem(self._keys_of(vendor_id), digest)
            pipe.hset(self.key_index, hash_key(key), vendor_id)
            pipe.sadd(self._keys_of(vendor_id), hash_key(key))
            pipe.hset(self._vendor(vendor_id), "updated_ms", _now_ms())
            await pipe.execute()
        return key

    async def set_webhook(self, vendor_id: str, url: str) -> str | None:
        """Point the vendor's webhook at url (checked by the caller; "" removes it) and
        enable it; returns the signing secret when one was made (shown once)."""
        await self._require(vendor_id)
        return await webhook_registry.set_endpoint(self.redis, self.prefix, vendor_id, url)

    async def rotate_webhook_secret(self, vendor_id: str, grace_s: int) -> str:
        if grace_s < 0:
            raise RegistryError("grace must be 0 or more seconds")
        await self._require(vendor_id)
        return await webhook_registry.rotate_secret(self.redis, self.prefix, vendor_id, grace_s)

    async def set_active(self, vendor_id: str, active: bool) -> Vendor:
        await self._require(vendor_id)
        await self.redis.hset(
            self._vendor(vendor_id),
            mapping={"status": "active" if active else "disabled", "updated_ms": _now_ms()},
        )
        return await self.get(vendor_id)

    async def _require(self, vendor_id: str) -> None:
        if not await self.redis.sismember(self.ids, vendor_id):
            raise RegistryError(f"no vendor {vendor_id!r}; `cutout-admin vendors list` shows them")

    async def get(self, vendor_id: str) -> Vendor:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._vendor(vendor_id))
            pipe.scard(self._keys_of(vendor_id))
            vendor_policy.queue_read(pipe, self.prefix, vendor_id)
            fields, keys, policy_reply = await pipe.execute()
        if not fields:
            raise RegistryError(f"no vendor {vendor_id!r}; `cutout-admin vendors list` shows them")
        f = {k.decode(): v.decode() for k, v in fields.items()}
        policy = vendor_policy.parse(policy_reply)
        return Vendor(
            id=vendor_id,
            active=f.get("status") == "active",
            weight=policy.weight or 1.0,
            limits=parse_quota_overrides(f.get("limits", "")),
            max_queued=policy.max_queued,
            created_ms=int(f.get("created_ms") or 0),
            keys=int(keys),
        )

    async def list(self) -> list[Vendor]:
        ids = sorted(v.decode() for v in cast(set[bytes], await self.redis.smembers(self.ids)))
        return [await self.get(v) for v in ids]

    async def lookup(self, digest: str) -> Vendor | None:
        """The vendor a key hash belongs to, if the key is current; None otherwise."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.key_index, digest)
            pipe.hget(self.key_expiry, digest)
            owner, expiry = await pipe.execute()
        if owner is None:
            return None
        if expiry is not None and int(expiry) <= _now_ms():
            vendor_id = owner.decode()
            async with self.redis.pipeline(transaction=True) as pipe:  # retire it for good
                pipe.hdel(self.key_index, digest)
                pipe.hdel(self.key_expiry, digest)
                pipe.srem(self._keys_of(vendor_id), digest)
                await pipe.execute()
            return None
        try:
            return await self.get(owner.decode())
        except RegistryError:
            return None
