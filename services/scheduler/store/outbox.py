"""The delivery outbox: succeeded jobs with something still to deliver.

Owns `deliveries` and `delivery_tries`: a LeasedOutbox (leased_outbox.py) of
job ids with backoff by tries.

COMPLETE queues a job here in the script that marks it SUCCEEDED. Deliverers
(services/scheduler/delivery.py) lease due ones (claim: each lease lasts
lease_ms, so another scheduler does not take it meanwhile and a crash only
delays it by the lease), load what they need, replace a job's result with its
uploaded copy (SWITCH_RESULT), and mark them done or due again later (each after
its own backoff, capped at MAX_BACKOFF_MS). Deliverers touch Redis only through
this class.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from cutout.v1 import jobs_pb2
from services.scheduler.keys import Keys
from services.scheduler.store import lua
from services.scheduler.store.leased_outbox import LeasedOutbox
from services.scheduler.store.model import Retention
from services.scheduler.store.outcomes import Switched

MAX_BACKOFF_MS = 5 * 60 * 1000

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


class Outbox(LeasedOutbox):
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, retention: Retention, lease_ms: int = 60_000
    ) -> None:
        super().__init__(redis, keys, "deliveries", "delivery_tries", lease_ms, MAX_BACKOFF_MS)
        self.retention = retention
        self._switch = lua.load(redis, SWITCH_RESULT)

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
