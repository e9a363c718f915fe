"""Per-vendor scheduling policy: the one interface between the vendor registry and the scheduler.

The registry (services/gateway/vendors.py, `cutout-admin vendors add|set`) writes a
vendor's policy here; the scheduler's Lua scripts read it (CLAIM the weight,
ENQUEUE the cap). Neither side knows the other's keys.

Redis key (under the cluster's prefix, default "cutout:"):
  vendor_policy:{vendor}  HASH
    weight      float, 0.01-1000: the vendor's share in deficit round robin
                (absent: CUTOUT_VENDOR_WEIGHTS, else 1)
    max_queued  int >= 0: cap on the vendor's waiting jobs (0 or absent: the cluster's
                CUTOUT_MAX_QUEUED_PER_VENDOR)
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

KEY = "vendor_policy:{vendor}"
WEIGHT = "weight"
MAX_QUEUED = "max_queued"


def key(prefix: str, vendor: str) -> str:
    return prefix + KEY.format(vendor=vendor)


@dataclass(frozen=True)
class Policy:
    weight: float | None = None  # None: the scheduler's configured weight, else 1
    max_queued: int = 0  # 0: the cluster default


def queue_read(pipe: aioredis.client.Pipeline, prefix: str, vendor: str) -> None:
    """Queue the read of the vendor's policy on pipe; `parse` its reply."""
    pipe.hmget(key(prefix, vendor), WEIGHT, MAX_QUEUED)


def parse(reply: list[bytes | None]) -> Policy:
    weight, max_queued = reply
    return Policy(float(weight) if weight else None, int(max_queued or 0))


def write(
    pipe: aioredis.client.Pipeline,
    prefix: str,
    vendor: str,
    weight: float | None = None,
    max_queued: int | None = None,
) -> None:
    """Queue the policy's changed fields on pipe (the caller's MULTI, beside its own writes)."""
    fields: dict[str, float | int] = {}
    if weight is not None:
        fields[WEIGHT] = weight
    if max_queued is not None:
        fields[MAX_QUEUED] = max_queued
    if fields:
        pipe.hset(key(prefix, vendor), mapping=fields)  # type: ignore[arg-type]


# Until this module, the policy lived in the registry's own hash (`vendor:{id}`,
# same field names, ids in `registry:vendors`). Moves each field from there to the
# policy, unless the policy has it already (written since by `cutout-admin vendors set`);
# one script, so that newer value is never overwritten with the older one.
_ADOPT = r"""
local P = ARGV[1]
local moved = 0
for _, vendor in ipairs(redis.call('SMEMBERS', P .. 'registry:vendors')) do
  local old, policy = P .. 'vendor:' .. vendor, P .. ARGV[2] .. vendor
  for _, field in ipairs({ARGV[3], ARGV[4]}) do
    local value = redis.call('HGET', old, field)
    if value then
      redis.call('HSETNX', policy, field, value)
      redis.call('HDEL', old, field)
      moved = moved + 1
    end
  end
end
return moved
"""


async def adopt_registry_fields(redis: aioredis.Redis, prefix: str) -> int:
    """Upgrade step, idempotent: policy fields an older registry kept in its own hash
    move here. The scheduler runs it at start, `cutout-admin vendors` before each command.

    Returns how many fields were moved (0 once done).
    """
    script = redis.register_script(_ADOPT)
    stem = KEY.removesuffix("{vendor}")
    return int(await script(args=[prefix, stem, WEIGHT, MAX_QUEUED]))
