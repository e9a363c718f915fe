"""Per-vendor, per-operation rate limits in Redis: GCRA, atomic Lua calls.

The generic cell rate algorithm keeps one number per (vendor, quota): the
theoretical arrival time (TAT). A quota of `limit` per `period` spaces
requests `period / limit` apart and lets a burst of up to `limit` through
when the vendor has been idle, so it never has a fixed window's edge where
twice the limit passes. A request for n units is admitted in part: as many
as fit (batch items are counted one by one), and the decision is atomic, so
200 concurrent requests against a limit of 30 admit exactly 30. The quotas one
image counts against (its operation's and `requests`) are taken together in
one call, all or nothing (`take_all`).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import redis.asyncio as aioredis

from services.common.errors import CutoutError
from services.gateway.metrics import RATE_LIMIT_REFUSALS

# ARGV: key, interval_ms, period_ms, wanted. Returns {admitted, tat_ms, now_ms}.
# Time is Redis's clock, so every gateway replica agrees on it.
GCRA = r"""
local key = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local wanted = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', key) or now)
if tat < now then tat = now end
-- Units that fit: each costs `interval`, and TAT may run at most `period` ahead.
local room = math.floor((now + period - tat) / interval)
local admitted = math.max(0, math.min(wanted, room))
if admitted > 0 then
  tat = tat + admitted * interval
  redis.call('SET', key, tat, 'PX', math.ceil(tat - now) + 1000)
end
return {admitted, tostring(tat), now}
"""

# ARGV: n, then n times (key, interval_ms, period_ms, wanted).
# All or nothing: the units are taken from every quota only if every quota has
# room for all it is asked; otherwise nothing is taken. One call for the
# quotas one image counts against (its operation and `requests`).
# Returns {now_ms, then per quota: fits (1/0), tat_ms after the call}.
GCRA_ALL = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[1])
local all, quotas = true, {}
for i = 0, n - 1 do
  local key = ARGV[2 + 4 * i]
  local interval, period = tonumber(ARGV[3 + 4 * i]), tonumber(ARGV[4 + 4 * i])
  local wanted = tonumber(ARGV[5 + 4 * i])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local fits = math.floor((now + period - tat) / interval) >= wanted
  if not fits then all = false end
  quotas[i + 1] = {key, tat, interval, wanted, fits}
end
local out = {now}
for _, q in ipairs(quotas) do
  local tat = q[2]
  if all then
    tat = tat + q[4] * q[3]
    redis.call('SET', q[1], tat, 'PX', math.ceil(tat - now) + 1000)
  end
  out[#out + 1] = q[5] and 1 or 0
  out[#out + 1] = tostring(tat)
end
return out
"""


@dataclass(frozen=True)
class Quota:
    """`limit` units per `period_s` seconds."""

    limit: int
    period_s: int

    @property
    def interval_ms(self) -> float:
        return self.period_s * 1000 / self.limit

    def __str__(self) -> str:
        return f"{self.limit}/{self.period_s}s"


# The old system's limits, per vendor: image requests (every submitted image,
# inline or URL, one by one or in a batch), background removals, bulk submissions.
DEFAULT_QUOTAS: dict[str, Quota] = {
    "requests": Quota(50, 15 * 60),
    "remove_background": Quota(30, 3600),
    "crop_face": Quota(30, 3600),
    "batches": Quota(10, 3600),
}
# What `cutout-admin up` and the tests' clusters use: generous, but still on.
GENEROUS = "requests=1000000/60,remove_background=1000000/60,crop_face=1000000/60,batches=100000/60"


def parse_quotas(spec: str) -> dict[str, Quota]:
    """ "requests=50/900,batches=10/3600" -> quotas; unnamed ones keep their defaults."""
    return {**DEFAULT_QUOTAS, **parse_quota_overrides(spec)}


def parse_quota_overrides(spec: str) -> dict[str, Quota]:
    """ "requests=50/900" -> only the quotas the spec names."""
    quotas: dict[str, Quota] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, _, rule = entry.partition("=")
        limit, _, period = rule.partition("/")
        if not (name and limit.isdigit() and period.isdigit() and int(limit) and int(period)):
            raise ValueError(f"rate limit {entry!r} is not name=LIMIT/SECONDS (both > 0)")
        quotas[name] = Quota(int(limit), int(period))
    return quotas


@dataclass(frozen=True)
class Decision:
    quota_name: str
    quota: Quota
    admitted: int
    wanted: int
    remaining: int
    reset_s: int  # until the quota is whole again
    retry_after_s: float  # until one more unit fits (0 when some were admitted and more fit)

    @property
    def allowed(self) -> bool:
        return self.admitted == self.wanted


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, prefix: str, quotas: dict[str, Quota]) -> None:
        self.redis = redis
        self.prefix = prefix
        self.quotas = quotas
        self._gcra = redis.register_script(GCRA)
        self._gcra_all = redis.register_script(GCRA_ALL)

    async def take(
        self, vendor: str, name: str, wanted: int = 1, quota: Quota | None = None
    ) -> Decision:
        """Admit up to `wanted` units of the vendor's `name` quota."""
        quota = quota or self.quotas[name]
        got = await self._gcra(
            args=[
                f"{self.prefix}rl:{vendor}:{name}",
                quota.interval_ms,
                quota.period_s * 1000,
                wanted,
            ]
        )
        return _decision(name, quota, wanted, int(got[0]), float(got[1]), int(got[2]))

    async def take_all(self, vendor: str, wanted: list[tuple[str, Quota]]) -> list[Decision]:
        """One unit of each named quota, all or nothing, in one round trip.

        Every decision is allowed, and the units taken, only when all of them
        fit; otherwise nothing is taken and the ones that did not fit are not
        allowed (their retry_after_s says when they will).
        """
        args: list[str | int | float] = [len(wanted)]
        for name, quota in wanted:
            args += [
                f"{self.prefix}rl:{vendor}:{name}",
                quota.interval_ms,
                quota.period_s * 1000,
                1,
            ]
        got = await self._gcra_all(args=args)
        now = int(got[0])
        return [
            _decision(name, quota, 1, int(got[1 + 2 * i]), float(got[2 + 2 * i]), now)
            for i, (name, quota) in enumerate(wanted)
        ]


def _decision(
    name: str, quota: Quota, wanted: int, admitted: int, tat: float, now: int
) -> Decision:
    ahead = max(0.0, tat - now)  # how far the vendor has borrowed into the future
    period_ms = quota.period_s * 1000
    remaining = max(0, int((period_ms - ahead) // quota.interval_ms))
    retry_ms = 0.0 if remaining else ahead - period_ms + quota.interval_ms
    return Decision(
        quota_name=name,
        quota=quota,
        admitted=admitted,
        wanted=wanted,
        remaining=remaining,
        reset_s=int(-(-ahead // 1000)),
        retry_after_s=max(0.0, retry_ms / 1000),
    )


def trailers(d: Decision) -> list[tuple[str, str]]:
    """IETF RateLimit header fields, as gRPC trailing metadata."""
    return [
        ("ratelimit-limit", str(d.quota.limit)),
        ("ratelimit-remaining", str(d.remaining)),
        ("ratelimit-reset", str(d.reset_s)),
        ("ratelimit-policy", f"{d.quota.limit};w={d.quota.period_s};name={d.quota_name}"),
    ]


def refusal(d: Decision, vendor: str) -> CutoutError:
    """RESOURCE_EXHAUSTED with RetryInfo, QuotaFailure and the RateLimit trailers."""
    wait = max(d.retry_after_s, 0.001)
    RATE_LIMIT_REFUSALS.labels(d.quota_name).inc()
    return CutoutError(
        f"rate limit: {d.quota_name} is limited to {d.quota.limit} per {d.quota.period_s} s "
        f"for vendor {vendor}; retry in {wait:.1f} s",
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        retry_after_s=wait,
        quota_violations=[
            (f"vendor:{vendor}", f"{d.quota_name}: {d.quota.limit} per {d.quota.period_s} s")
        ],
        trailers=trailers(d),
    )
