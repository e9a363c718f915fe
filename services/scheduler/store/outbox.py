"""The delivery outbox: succeeded jobs with something still to deliver.

Owns `deliveries` and `delivery_tries`.

COMPLETE queues a job here in the script that marks it SUCCEEDED. Deliverers
(services/scheduler/delivery.py) lease due ones, load what they need, replace
a job's result with its uploaded copy (SWITCH_RESULT), and mark them done or
due again later. Deliverers touch Redis only through this class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis

from cutout.v1 import jobs_pb2
from services.scheduler.keys import Keys
from services.scheduler.store import lua
from services.scheduler.store.model import Retention
from services.scheduler.store.outcomes import Switched

MAX_BACKOFF_MS = 5 * 60 * 1000

# ARGV: prefix, limit, lease_ms
# Leases up to `limit` due deliveries: each is pushed lease_ms into the future,
# so another scheduler does not take it while this one works; a crash only
# delays it by the lease. Returns the job ids.
CLAIM_DELIVERIES = r"""
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', key.deliveries(), '-inf', now,
  'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  redis.call('ZADD', key.deliveries(), now + tonumber(ARGV[3]), id)
end
return due
"""

# ARGV: prefix, base_ms, max_backoff_ms, id...
# Each delivery still in the outbox is due again after base, 2*base, 4*base, ...
# (its own tries) capped at max_backoff_ms; one another deliverer finished meanwhile
# stays finished. Returns nothing.
LATER = r"""
local now, base, cap = now_ms(), tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4, #ARGV do
  local id = ARGV[i]
  if redis.call('ZSCORE', key.deliveries(), id) then
    local tries = redis.call('HINCRBY', key.delivery_tries(), id, 1)
    redis.call('ZADD', key.deliveries(), now + math.min(cap, base * 2 ^ (tries - 1)), id)
  end
end
"""

# ARGV: prefix, id, result as read (serialised), new result (serialised), old uri, new uri,
#       retention_s
# Replaces a SUCCEEDED job's result, if it is still the one the deliverer read
# (compare-and-set: of two deliverers of one job, one wins). In the same step the
# new URI takes over the old one's retention deadline, the old copy becomes due for
# deletion at once (no job points at it; if the deliverer dies before deleting it,
# the sweeper does), and an event carries the new result, so WatchJob replays it.
# Returns {SWITCHED_SWITCHED, new result}, {SWITCHED_MOVED_ON, the job's current
# result (serialised)}, or {SWITCHED_GONE, false} when the job has expired (the new
# URI is then due for deletion at once: nothing points at it).
SWITCH_RESULT = r"""
local id, read, new, old_uri, new_uri = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local jk = key.job(id)
local st = redis.call('HMGET', jk, 'state', 'result')
local now = now_ms()
if not st[1] then
  -- No job will point at the upload: due for deletion at once, never leaked.
  redis.call('ZADD', key.blobs(), now, new_uri)
  return {SWITCHED_GONE, false}
end
if not state_is(st[1], STATE_SUCCEEDED) or st[2] ~= read then return {SWITCHED_MOVED_ON, st[2]} end
local deadline = redis.call('ZSCORE', key.blobs(), old_uri)
if not deadline then
  local ttl = redis.call('PTTL', jk)
  deadline = ttl > 0 and now + ttl or now + tonumber(ARGV[7]) * 1000
end
redis.call('ZADD', key.blobs(), deadline, new_uri)
if old_uri ~= new_uri then redis.call('ZADD', key.blobs(), now, old_uri) end
redis.call('HSET', jk, 'result', new, 'update_ms', now)
event(id, 'result', new, 'update_ms', now)
return {SWITCHED_SWITCHED, new}
"""

_FIELDS = ("vendor", "result", "record", "create_ms", "end_ms")


@dataclass
class Delivery:
    """A succeeded job as its deliverer needs it."""

    job_id: str
    vendor: str
    result: jobs_pb2.Result
    stored_result: bytes  # the result as read: what SWITCH_RESULT compares with
    record: jobs_pb2.RecordRef | None
    created_ms: int
    done_ms: int  # when it succeeded (ms since the epoch)


class Outbox:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, retention: Retention, lease_ms: int = 60_000
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.retention = retention
        self.lease_ms = lease_ms
        self._claim = lua.load(redis, CLAIM_DELIVERIES)
        self._later = lua.load(redis, LATER)
        self._switch = lua.load(redis, SWITCH_RESULT)

    async def claim(self, limit: int) -> list[str]:
        """Lease up to limit due deliveries for lease_ms; their job ids."""
        got = await self._claim(args=[self.keys.prefix, limit, self.lease_ms])
        return [g.decode() for g in cast(list[bytes], got)]

    async def load(self, job_ids: list[str]) -> tuple[list[Delivery], list[str]]:
        """The deliveries of job_ids, and the ids whose jobs have expired."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self.keys.job(job_id), *_FIELDS)
            rows = await pipe.execute()
        due: list[Delivery] = []
        gone: list[str] = []
        for job_id, (vendor, result, record, created, ended) in zip(job_ids, rows, strict=True):
            if not vendor or not result:
                gone.append(job_id)
                continue
            ref = jobs_pb2.RecordRef.FromString(record) if record else None
            parsed = jobs_pb2.Result.FromString(result)
            due.append(
                Delivery(
                    job_id, vendor.decode(), parsed, result, ref, int(created or 0), int(ended or 0)
                )
            )
        return due, gone

    async def switch_result(self, delivery: Delivery, uri: str) -> Switched:
        """Point the job at uri instead of its result's current URI, unless another
        deliverer did first. Either way delivery.result becomes the job's result now."""
        new = jobs_pb2.Result()
        new.CopyFrom(delivery.result)
        new.uri = uri
        got = await self._switch(
            args=[
                self.keys.prefix,
                delivery.job_id,
                delivery.stored_result,
                new.SerializeToString(),
                delivery.result.uri,
                uri,
                self.retention.finished_s,
            ]
        )
        outcome, current = Switched(int(got[0])), got[1]
        if current is not None:
            delivery.stored_result = current
            delivery.result = jobs_pb2.Result.FromString(current)
        return outcome

    async def done(self, job_ids: list[str]) -> None:
        if job_ids:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self.keys.deliveries, *job_ids)
                pipe.hdel(self.keys.delivery_tries, *job_ids)
                await pipe.execute()

    async def later(self, job_ids: list[str], base_ms: int) -> None:
        """Push each delivery back by its own backoff, in one script call."""
        if job_ids:
            await self._later(args=[self.keys.prefix, base_ms, MAX_BACKOFF_MS, *job_ids])

    async def pending(self) -> int:
        """Deliveries not made yet (due or leased)."""
        return int(await self.redis.zcard(self.keys.deliveries))
