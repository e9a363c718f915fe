"""A vendor's webhook endpoint and signing secrets: the one interface between the
vendor registry (which writes them: `cutout-admin vendors set V --webhook URL`,
`cutout-admin vendors rotate-webhook-secret V`) and the scheduler (which reads them:
its Lua scripts queue a delivery when a job finishes, its sender signs with the secrets).

Redis keys (under the cluster's prefix, default "cutout:"):
  webhook_endpoint:{vendor}  HASH  url, status (active | disabled), reason (why it was
                                   disabled: "HTTP 410 from the endpoint"), updated_ms
  webhook_secrets:{vendor}   HASH  secret ("whsec_" + base64 of 32 random bytes) ->
                                   0 for the current one, else the ms since the epoch
                                   when a rotated-out secret stops being used

Deliveries are signed with every secret still valid (Standard Webhooks allows several
signatures in one header), so a receiver can switch to the new secret at any time
within the grace period.
"""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis

ENDPOINT_KEY = "webhook_endpoint:{vendor}"
SECRETS_KEY = "webhook_secrets:{vendor}"
URL = "url"
STATUS = "status"
ACTIVE = "active"
DISABLED = "disabled"


def _now_ms() -> int:
    return int(time.time() * 1000)


def endpoint_key(prefix: str, vendor: str) -> str:
    return prefix + ENDPOINT_KEY.format(vendor=vendor)


def secrets_key(prefix: str, vendor: str) -> str:
    return prefix + SECRETS_KEY.format(vendor=vendor)


def new_secret() -> str:
    """A Standard Webhooks secret: "whsec_" and the base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class Endpoint:
    url: str = ""
    active: bool = False
    reason: str = ""  # why it is disabled
    secrets: tuple[str, ...] = ()  # valid now, the current one first


async def read(redis: aioredis.Redis, prefix: str, vendor: str) -> Endpoint:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(endpoint_key(prefix, vendor))
        pipe.hgetall(secrets_key(prefix, vendor))
        fields, stored = await pipe.execute()
    f = {k.decode(): v.decode() for k, v in cast(dict[bytes, bytes], fields).items()}
    now = _now_ms()
    valid = sorted(
        (int(expiry), s.decode())
        for s, expiry in cast(dict[bytes, bytes], stored).items()
        if int(expiry) == 0 or int(expiry) > now
    )
    return Endpoint(
        url=f.get(URL, ""),
        active=f.get(STATUS) == ACTIVE and bool(f.get(URL)),
        reason=f.get("reason", ""),
        secrets=tuple(s for _, s in valid),
    )


async def set_endpoint(redis: aioredis.Redis, prefix: str, vendor: str, url: str) -> str | None:
    """Point the vendor's webhook at url ("" removes it) and make it active again.

    Returns a new signing secret when the vendor had none (shown once), else None:
    the secret stays the same when the URL changes.
    """
    secret = None
    stored = await redis.hgetall(secrets_key(prefix, vendor))
    async with redis.pipeline(transaction=True) as pipe:
        if url:
            pipe.hset(
                endpoint_key(prefix, vendor),
                mapping={URL: url, STATUS: ACTIVE, "reason": "", "updated_ms": _now_ms()},
            )
            if not any(int(v) == 0 for v in cast(dict[bytes, bytes], stored).values()):
                secret = new_secret()
                pipe.hset(secrets_key(prefix, vendor), secret, 0)
        else:
            pipe.delete(endpoint_key(prefix, vendor))
        await pipe.execute()
    return secret


async def rotate_secret(redis: aioredis.Redis, prefix: str, vendor: str, grace_s: int) -> str:
    """A new current secret; the old ones are used beside it for grace_s more seconds."""
    stored = cast(dict[bytes, bytes], await redis.hgetall(secrets_key(prefix, vendor)))
    secret = new_secret()
    deadline = _now_ms() + grace_s * 1000
    async with redis.pipeline(transaction=True) as pipe:
        for old, expiry in stored.items():
            if grace_s <= 0 or 0 < int(expiry) <= _now_ms():
                pipe.hdel(secrets_key(prefix, vendor), old)
            else:
                # One already on its way out keeps its earlier deadline.
                pipe.hset(secrets_key(prefix, vendor), old, min(deadline, int(expiry) or deadline))
        pipe.hset(secrets_key(prefix, vendor), secret, 0)
        await pipe.execute()
    return secret


async def disable(redis: aioredis.Redis, prefix: str, vendor: str, url: str, reason: str) -> bool:
    """Disable the vendor's endpoint if it is still url; True if this call disabled it."""
    key = endpoint_key(prefix, vendor)
    script = redis.register_script(
        "if redis.call('HGET', KEYS[1], 'url') == ARGV[1] and "
        "redis.call('HGET', KEYS[1], 'status') == 'active' then "
        "redis.call('HSET', KEYS[1], 'status', 'disabled', 'reason', ARGV[2], "
        "'updated_ms', ARGV[3]) return 1 end return 0"
    )
    return bool(await script(keys=[key], args=[url, reason, _now_ms()]))
