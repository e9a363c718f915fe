"""Submissions: a job stored and queued in one script, behind idempotency keys and admission caps.

Owns the `idempotency`, `seq`, `vendor_jobs`, `vendors` and `batch` keys, and
creates each job's hash, input and event stream.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.typing import EncodableT

from cutout.v1 import jobs_pb2
from services.common.errors import CutoutError, ResourceExhausted
from services.common.operations import Lane
from services.scheduler import metrics
from services.scheduler.keys import Keys, job_cost
from services.scheduler.store import lua
from services.scheduler.store.model import (
    Admission,
    Fields,
    FleetCapacity,
    NewJob,
    Retention,
    job_from_fields,
    place_of,
)
from services.scheduler.store.outcomes import Enqueued

# ARGV: prefix, id, vendor, priority, operation, record, client_key, batch,
#       input_pixels, image, idempotency_ttl_s, cost, max_queued_vendor,
#       max_queued_total, lane ('' or 'light:'), batch_ttl_s, webhook_url
# Returns {ENQUEUED_NEW, id, fields, rank, active, run_ms} for a new job,
# {ENQUEUED_DEDUPLICATED, existing_id, ...the same} for a repeated idempotency key:
# fields is the job hash (flat), rank its 0-based rank in its queue or false when
# not queued, active the vendors waiting in its lane, run_ms the lane's average run
# time or false; so the caller builds the Job without a second round trip.
# {ENQUEUED_VENDOR_FULL, cap} or {ENQUEUED_CLUSTER_FULL, ''} when a cap refuses it.
ENQUEUE = r"""
local id, vendor, prio, ck = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[7]
local function reply(code, jid)
  local f = redis.call('HGETALL', key.job(jid))
  local h = {}
  for i = 1, #f, 2 do h[f[i]] = f[i + 1] end
  local rank, active, run = false, 0, false
  if state_is(h['state'], STATE_QUEUED) then
    local lane = h['lane'] or ''
    rank = redis.call('ZRANK', key.queue(lane, vendor), jid)
    active = redis.call('SCARD', key.ring_members(lane))
    run = redis.call('HGET', key.eta(), lane .. 'run_ms')
  end
  return {code, jid, f, rank, active, run}
end
if ck ~= '' then
  local existing = redis.call('GET', key.idempotency(vendor, ck))
  if existing and redis.call('EXISTS', key.job(existing)) == 1 then
    return reply(ENQUEUED_DEDUPLICATED, existing)
  end
end
-- Admission control: shed load before Redis memory fills. Both lanes count:
-- the caps protect Redis memory, which they share.
local mine, waiting = 0, 0
for _, lane in ipairs(LANES) do
  mine = mine + redis.call('ZCARD', key.queue(lane, vendor))
  for _, v in ipairs(redis.call('SMEMBERS', key.ring_members(lane))) do
    waiting = waiting + redis.call('ZCARD', key.queue(lane, v))
  end
end
-- The vendor's own cap (vendor policy, `cutout-admin vendors ... --max-queued`) beats the default.
local cap = tonumber(redis.call('HGET', key.vendor_policy(vendor), POLICY_MAX_QUEUED) or '0') or 0
if cap <= 0 then cap = tonumber(ARGV[13]) end
if mine >= cap then return {ENQUEUED_VENDOR_FULL, tostring(cap)} end
if waiting >= tonumber(ARGV[14]) then return {ENQUEUED_CLUSTER_FULL, ''} end
local now = now_ms()
local seq = redis.call('INCR', key.seq())
local score = (MAX_PRIORITY - prio) * PRIORITY_BAND + seq
redis.call('HSET', key.job(id), 'vendor', vendor, 'state', STATE_QUEUED, 'stage', STAGE_QUEUED,
  'progress', 0, 'priority', prio, 'attempt', 0, 'node', '', 'client_key', ck,
  'batch', ARGV[8], 'input_pixels', ARGV[9], 'operation', ARGV[5], 'record', ARGV[6],
  'seq', seq, 'score', score, 'cost', tonumber(ARGV[12]), 'create_ms', now, 'update_ms', now,
  'lane', ARGV[15], 'webhook', ARGV[17])
redis.call('SET', key.input(id), ARGV[10])
if ARGV[8] ~= '' then
  -- The batch's members, for WatchBatch and CancelBatch; kept as long as its jobs.
  local bk = key.batch(vendor, ARGV[8])
  redis.call('SADD', bk, id)
  redis.call('EXPIRE', bk, tonumber(ARGV[16]))
  -- Its jobs not finished yet: finish() queues batch.completed when this reaches 0.
  redis.call('HINCRBY', key.batch_open(), vendor .. '/' .. ARGV[8], 1)
end
redis.call('ZADD', key.vendor_jobs(vendor), seq, id)
redis.call('SADD', key.vendors(), vendor)
if ck ~= '' then
  redis.call('SET', key.idempotency(vendor, ck), id, 'EX', tonumber(ARGV[11]))
end
event(id, 'state', STATE_QUEUED, 'stage', STAGE_QUEUED, 'progress', 0, 'update_ms', now)
enqueue_ready(id, vendor, score)
return reply(ENQUEUED_NEW, id)
"""


class Submissions:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        retention: Retention,
        admission: Admission,
        fleet_capacity: FleetCapacity,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.retention = retention
        self.admission = admission
        self.fleet_capacity = fleet_capacity
        self._enqueue = lua.load(redis, ENQUEUE)

    async def enqueue(
        self,
        vendor: str,
        submission: jobs_pb2.JobSubmission,
        image: bytes,
        input_pixels: int,
        batch: str = "",
    ) -> tuple[jobs_pb2.Job, bool]:
        """Store and queue a job. Returns (job, deduplicated); raises the admission error."""
        new = NewJob(vendor, submission, image, input_pixels, batch)
        (outcome,) = await self.enqueue_many([new])
        if isinstance(outcome, CutoutError):
            raise outcome
        return outcome

    async def enqueue_many(
        self, jobs: Sequence[NewJob]
    ) -> list[tuple[jobs_pb2.Job, bool] | CutoutError]:
        """Store and queue jobs in one round trip; each is accepted or refused on its own.

        Returns, per job in order, (job, deduplicated) or the admission error
        that refused it.
        """
        async with self.redis.pipeline(transaction=False) as pipe:
            for new in jobs:
                await self._enqueue(args=self._args(new), client=pipe)
            replies = await pipe.execute(raise_on_error=True)
        return [self._outcome(new, reply) for new, reply in zip(jobs, replies, strict=True)]

    def _args(self, new: NewJob) -> list[EncodableT]:
        sub = new.submission
        return [
            self.keys.prefix,
            uuid.uuid4().hex,
            new.vendor,
            sub.priority,
            sub.operation.SerializeToString(),
            sub.record.SerializeToString() if sub.HasField("record") else b"",
            sub.client_key,
            new.batch,
            new.input_pixels,
            new.image,
            self.retention.idempotency_s,
            job_cost(new.input_pixels),
            self.admission.max_queued_per_vendor,
            self.admission.max_queued,
            Lane.of(sub.operation),
            self.retention.finished_s + 24 * 3600,
            sub.webhook_url,
        ]

    def _outcome(self, new: NewJob, reply: list[Any]) -> tuple[jobs_pb2.Job, bool] | CutoutError:
        code, got = Enqueued(int(reply[0])), reply[1]
        if code == Enqueued.VENDOR_FULL:
            metrics.ADMISSION_REFUSALS.labels("vendor").inc()
            return self._refusal(
                f"vendor {new.vendor} already has {got.decode()} jobs "
                "waiting; retry once some have started"
            )
        if code == Enqueued.CLUSTER_FULL:
            metrics.ADMISSION_REFUSALS.labels("cluster").inc()
            return self._refusal(
                f"the cluster has {self.admission.max_queued} jobs waiting and sheds load; "
                "retry shortly"
            )
        flat, rank, active, run_ms = reply[2], reply[3], reply[4], reply[5]
        fields: Fields = dict(zip(flat[::2], flat[1::2], strict=True))
        lane = Lane.parse(fields.get(b"lane"))
        place = place_of(rank, int(active), run_ms, self.fleet_capacity(lane))
        deduplicated = code == Enqueued.DEDUPLICATED
        metrics.JOBS_ENQUEUED.labels("deduplicated" if deduplicated else "queued").inc()
        return job_from_fields(got.decode(), fields, place), deduplicated

    def _refusal(self, message: str) -> ResourceExhausted:
        return ResourceExhausted(message, retry_after_s=self.admission.retry_after_s)
