"""Attempts: what happens to a claimed job until it succeeds, fails, or goes back to wait.

Owns `leases`, `delayed`, `running`, `counters` and `eta`, and the job hash's
`free_attempts`: attempts lost to the cluster's own faults, which do not use
up the job's retries (a job's `attempt` counts every start; its retry budget
only the charged ones). Every script that
acts for an attempt takes its number and does nothing (FENCE_LOST,
RETRIED_FENCED) when the job has moved on: a lease that expired, a
cancellation, or another dispatch. That fencing makes a late or duplicate
node answer harmless.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import redis.asyncio as aioredis
from google.rpc import status_pb2
from redis.asyncio.client import Pipeline
from redis.typing import EncodableT

from cutout.v1 import jobs_pb2
from services.common.errors import status_from_code
from services.scheduler.keys import Keys
from services.scheduler.store import lua
from services.scheduler.store.model import Claim, Completion, Retention, RetryPolicy
from services.scheduler.store.outcomes import Charge, Fence, Retried
from services.scheduler.store.retention import BlobRetention

_HELPERS = r"""
-- The job's vendor if it is RUNNING on this attempt, else nil.
local function fenced(id, attempt)
  local st = redis.call('HMGET', key.job(id), 'state', 'attempt', 'vendor')
  if not state_is(st[1], STATE_RUNNING) or st[2] ~= attempt then return nil end
  return st[3]
end
-- A failed or lost attempt (the attempt-th), charged to the job or not (CHARGE_FREE:
-- the cluster's own fault, up to max_free of them; they are kept in `free_attempts`).
-- While the charged attempts (attempt - free_attempts) are within max_retries it
-- waits base_ms * 2^(charged-1) * jitter, then goes back to its old place in the
-- queue (see PROMOTE); after that it FAILS into the dead-letter queue, input kept.
local function retry_or_dead_letter(id, vendor, attempt, max_retries, base_ms, jitter, err,
                                    retention, charge, max_free)
  leave_running(id, vendor)
  local jk = key.job(id)
  local free = tonumber(redis.call('HGET', jk, 'free_attempts') or '0')
  if charge == CHARGE_FREE and free < max_free then
    free = redis.call('HINCRBY', jk, 'free_attempts', 1)
    count(vendor, 'free_retries')
  end
  local charged = attempt - free
  if charged > max_retries then
    local progress = tonumber(redis.call('HGET', jk, 'progress'))
    redis.call('HSET', jk, 'dead_lettered', 1)
    finish(id, STATE_FAILED, progress, 'error', err, retention)
    event(id, 'dead_lettered', 1)
    redis.call('EXPIRE', key.input(id), retention)
    redis.call('ZADD', key.dead_letters(vendor), now_ms(), id)
    count(vendor, 'dead_lettered')
    return RETRIED_DEAD_LETTERED
  end
  count(vendor, 'retried')
  local now = now_ms()
  local due = now + math.floor(base_ms * 2 ^ (math.max(charged, 1) - 1) * jitter)
  redis.call('HSET', jk, 'state', STATE_QUEUED, 'stage', STAGE_QUEUED, 'progress', 0, 'node', '',
    'last_error', err, 'retry_ms', due, 'update_ms', now)
  event(id, 'state', STATE_QUEUED, 'stage', STAGE_QUEUED, 'progress', 0, 'node', '',
    'retry_ms', due, 'update_ms', now)
  redis.call('ZADD', key.delayed(), due, id)
  return RETRIED_RETRYING
end
"""

# ARGV: prefix, id, attempt, lease_ms, then any number of (stage, progress) pairs
# Renews the lease and records each pair in order (progress never decreasing),
# one event per pair, so watchers see every stage even when a fast attempt's
# stages arrive together. No pairs = renew only. Returns a Fence.
PROGRESS = r"""
local id, attempt = ARGV[2], ARGV[3]
if not fenced(id, attempt) then return FENCE_LOST end
local now = now_ms()
redis.call('ZADD', key.leases(), 'XX', now + tonumber(ARGV[4]), id)
local jk = key.job(id)
local progress = tonumber(redis.call('HGET', jk, 'progress'))
for i = 5, #ARGV - 1, 2 do
  local stage = tonumber(ARGV[i])
  progress = math.max(progress, tonumber(ARGV[i + 1]))
  redis.call('HSET', jk, 'stage', stage, 'progress', progress, 'update_ms', now)
  event(id, 'stage', stage, 'progress', progress, 'update_ms', now)
end
return FENCE_HELD
"""

# ARGV: prefix, lease_ms, then (id, attempt) pairs: every attempt a scheduler runs.
# Each lease that attempt still holds is renewed; returns the ids whose fence is lost
# (cancelled, or re-leased elsewhere), whose attempts should stop.
RENEW_MANY = r"""
local expires = now_ms() + tonumber(ARGV[2])
local lost = {}
for i = 3, #ARGV - 1, 2 do
  local id = ARGV[i]
  if fenced(id, ARGV[i + 1]) then
    redis.call('ZADD', key.leases(), 'XX', expires, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
"""

# ARGV: prefix, id, attempt, result, retention_s, deliver
# SUCCEEDED with the result, input freed. deliver=1: the job still has a delivery
# to make (a pending upload, a record update); only the attempt that holds the
# fence queues it in the outbox, so it is made once. Returns a Fence.
# (Attempts.complete registers the output for retention in the same round trip,
# before this runs, so an attempt that loses the fence cannot leak it.)
COMPLETE = r"""
local id = ARGV[2]
local vendor = fenced(id, ARGV[3])
if not vendor then return FENCE_LOST end
leave_running(id, vendor)
-- Moving average of attempt run time per lane ('run_ms', 'light:run_ms'): what queue
-- ETAs are estimated from. Light jobs must not make inference ETAs look short.
local timing = redis.call('HMGET', key.job(id), 'start_ms', 'lane')
local started = tonumber(timing[1] or '0')
if started > 0 then
  local run = now_ms() - started
  local field = (timing[2] or '') .. 'run_ms'
  local avg = tonumber(redis.call('HGET', key.eta(), field) or run)
  redis.call('HSET', key.eta(), field, avg + (run - avg) * 0.1)
end
count(vendor, 'succeeded')
if ARGV[6] == '1' then redis.call('ZADD', key.deliveries(), now_ms(), id) end
finish_and_free(id, STATE_SUCCEEDED, 100, 'result', ARGV[4], tonumber(ARGV[5]))
return FENCE_HELD
"""

# ARGV: prefix, id, attempt, error, retention_s
# FAILED for good (not retried), input freed. Returns a Fence.
FAIL = r"""
local id = ARGV[2]
local vendor = fenced(id, ARGV[3])
if not vendor then return FENCE_LOST end
leave_running(id, vendor)
local progress = tonumber(redis.call('HGET', key.job(id), 'progress'))
count(vendor, 'failed')
finish_and_free(id, STATE_FAILED, progress, 'error', ARGV[4], tonumber(ARGV[5]))
return FENCE_HELD
"""

# ARGV: prefix, id, attempt, max_retries, base_delay_ms, jitter, error, retention_s, charge,
#       max_free
# charge (a Charge): CHARGE_REFUNDED, the node refused before doing any work (full or
# draining): straight back to the queue, attempt not counted. CHARGE_FREE: lost to the
# cluster's own fault: backs off like a retry without using one up. Returns a Retried.
RETRY = r"""
local id = ARGV[2]
local vendor = fenced(id, ARGV[3])
if not vendor then return RETRIED_FENCED end
local charge = tonumber(ARGV[9])
if charge == CHARGE_REFUNDED then
  leave_running(id, vendor)
  local jk = key.job(id)
  local now = now_ms()
  redis.call('HINCRBY', jk, 'attempt', -1)
  count(vendor, 'attempts', -1)
  redis.call('HSET', jk, 'state', STATE_QUEUED, 'stage', STAGE_QUEUED, 'progress', 0, 'node', '',
    'update_ms', now)
  event(id, 'state', STATE_QUEUED, 'stage', STAGE_QUEUED, 'progress', 0, 'node', '',
    'update_ms', now)
  enqueue_ready(id, vendor, tonumber(redis.call('HGET', jk, 'score')))
  return RETRIED_REQUEUED
end
return retry_or_dead_letter(id, vendor, tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]),
  tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[8]), charge, tonumber(ARGV[10]))
"""

# ARGV: prefix, max_retries, base_delay_ms, jitter, error, retention_s, limit, max_free
# Leases past their deadline: the scheduler running the job stopped renewing them
# (it died, or lost Redis for longer than a lease); a node's own failures reach its
# scheduler, which retries them itself. So each such job is retried free of charge
# (CHARGE_FREE), or dead-lettered. Returns the ids of the expired leases.
REAP = r"""
local expired = redis.call('ZRANGEBYSCORE', key.leases(), '-inf', now_ms(),
  'LIMIT', 0, tonumber(ARGV[7]))
for _, id in ipairs(expired) do
  local st = redis.call('HMGET', key.job(id), 'state', 'attempt', 'vendor')
  if state_is(st[1], STATE_RUNNING) then
    count(st[3], 'lease_lost')
    retry_or_dead_letter(id, st[3], tonumber(st[2]), tonumber(ARGV[2]), tonumber(ARGV[3]),
      tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]), CHARGE_FREE, tonumber(ARGV[8]))
  else
    redis.call('ZREM', key.leases(), id)
  end
end
return expired
"""

# ARGV: prefix, limit
# Retries whose backoff is over go back to their old place in their queue.
# Returns how many backoffs ended (a job cancelled meanwhile just leaves `delayed`).
PROMOTE = r"""
local due = redis.call('ZRANGEBYSCORE', key.delayed(), '-inf', now_ms(),
  'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  redis.call('ZREM', key.delayed(), id)
  local st = redis.call('HMGET', key.job(id), 'state', 'vendor', 'score')
  if state_is(st[1], STATE_QUEUED) then
    enqueue_ready(id, st[2], tonumber(st[3]))
  end
end
return #due
"""


class Attempts:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        retention: Retention,
        retries: RetryPolicy,
        blobs: BlobRetention,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.retention = retention
        self.retries = retries
        self.blobs = blobs
        self._progress = lua.load(redis, _HELPERS, PROGRESS)
        self._complete = lua.load(redis, _HELPERS, COMPLETE)
        self._fail = lua.load(redis, _HELPERS, FAIL)
        self._retry = lua.load(redis, _HELPERS, RETRY)
        self._reap = lua.load(redis, _HELPERS, REAP)
        self._promote = lua.load(redis, PROMOTE)
        self._renew_many = lua.load(redis, _HELPERS, RENEW_MANY)

    async def progress(
        self, claim: Claim, updates: Sequence[tuple[int, int]], lease_ms: int
    ) -> bool:
        """Record (stage, percent) updates in order and renew the lease.

        False when the attempt is fenced off (cancelled, or re-leased elsewhere).
        """
        got = await self._progress(args=self._progress_args(claim, updates, lease_ms))
        return Fence(int(got)) == Fence.HELD

    def _progress_args(
        self, claim: Claim, updates: Sequence[tuple[int, int]], lease_ms: int
    ) -> list[EncodableT]:
        args: list[EncodableT] = [self.keys.prefix, claim.job_id, claim.attempt, lease_ms]
        for stage, percent in updates:
            args += [stage, percent]
        return args

    async def renew_many(self, claims: Sequence[Claim], lease_ms: int) -> list[str]:
        """Renew the leases of all these attempts in one round trip; the job ids of
        those that no longer hold their job (cancelled, or re-leased elsewhere)."""
        args: list[EncodableT] = [self.keys.prefix, lease_ms]
        for claim in claims:
            args += [claim.job_id, claim.attempt]
        lost = await self._renew_many(args=args)
        return [job_id.decode() for job_id in lost or []]

    async def complete(
        self,
        claim: Claim,
        result: jobs_pb2.Result,
        deliver: bool = False,
        updates: Sequence[tuple[int, int]] = (),
        lease_ms: int = 0,
    ) -> bool:
        """SUCCEEDED, if this attempt still holds the job; deliver queues its delivery.

        In the same round trip, and before it: the progress `updates` not yet
        written (so watchers still see every stage) and the output's URI
        registered for retention.
        """
        done = await self.complete_many([Completion(claim, result, deliver, updates, lease_ms)])
        return done[0]

    async def complete_many(self, completions: Sequence[Completion]) -> list[bool]:
        """Several `complete`s in one round trip (each still its own fenced script).

        A busy scheduler finishes many attempts at once; one round trip each
        was a good part of its CPU per job (bench/scale.py).
        """
        ends: list[int] = []  # where each completion's COMPLETE reply is

        async def build(pipe: Pipeline) -> None:
            ends.clear()
            for c in completions:
                if c.updates:
                    await self._progress(
                        args=self._progress_args(c.claim, c.updates, c.lease_ms), client=pipe
                    )
                # The output lives as long as the job record; registered even when
                # the fence below refuses, so a lost attempt's output is swept too.
                self.blobs.register(pipe, c.result.uri)
                await self._complete(
                    args=[
                        self.keys.prefix,
                        c.claim.job_id,
                        c.claim.attempt,
                        c.result.SerializeToString(),
                        self.retention.finished_s,
                        int(c.deliver),
                    ],
                    client=pipe,
                )
                ends.append(len(pipe) - 1)

        # A script Redis lacks (NOSCRIPT) is loaded and only the commands it refused run
        # again: a progress update that ran must not run twice (its stages would be
        # repeated in the job's events, after the ones that followed them).
        replies = await lua.execute_loaded(self.redis, build, [self._progress, self._complete])
        return [Fence(int(replies[i])) == Fence.HELD for i in ends]

    async def fail(self, claim: Claim, error: status_pb2.Status) -> bool:
        """FAILED for good (not retried), if this attempt still holds the job."""
        got = await self._fail(
            args=[
                self.keys.prefix,
                claim.job_id,
                claim.attempt,
                error.SerializeToString(),
                self.retention.finished_s,
            ]
        )
        return Fence(int(got)) == Fence.HELD

    async def retry(
        self, claim: Claim, error: status_pb2.Status, charge: Charge = Charge.COUNTED
    ) -> Retried:
        """Back off and retry, or dead-letter once the retries are used up.

        charge: COUNTED uses up a retry; REFUNDED (the node refused the attempt
        before starting it) requeues at once without counting it; FREE (the
        cluster's own fault) backs off without using up a retry, up to
        RetryPolicy.max_free times per job.
        """
        got = await self._retry(
            args=[
                self.keys.prefix,
                claim.job_id,
                claim.attempt,
                self.retries.max_retries,
                self.retries.base_delay_ms,
                self.retries.jitter_factor(),
                error.SerializeToString(),
                self.retention.finished_s,
                int(charge),
                self.retries.max_free,
            ]
        )
        return Retried(int(got))

    async def reap(self, limit: int = 100) -> list[str]:
        """Retry (or dead-letter) jobs whose lease expired, free of charge; returns their ids."""
        error = status_from_code(
            grpc.StatusCode.UNAVAILABLE,
            "lease expired: the scheduler running this job stopped renewing it "
            "(it stopped, or lost Redis)",
        )
        got = await self._reap(
            args=[
                self.keys.prefix,
                self.retries.max_retries,
                self.retries.base_delay_ms,
                self.retries.jitter_factor(),
                error.SerializeToString(),
                self.retention.finished_s,
                limit,
                self.retries.max_free,
            ]
        )
        return [g.decode() for g in got]

    async def promote(self, limit: int = 500) -> int:
        """Put jobs whose backoff is over back in their queues; returns how many."""
        return int(await self._promote(args=[self.keys.prefix, limit]))
