"""Dead letters: jobs that FAILED after their last retry, input kept (`dead_letters` sets).

attempts.py puts them there; operators list, requeue and purge them here.
"""

from __future__ import annotations

from typing import cast

import grpc
import redis.asyncio as aioredis

from cutout.names import job_name
from cutout.v1 import jobs_pb2
from services.common.errors import CutoutError, not_found
from services.scheduler.keys import Keys
from services.scheduler.store import lua
from services.scheduler.store.jobs import Jobs
from services.scheduler.store.model import Fields, job_from_fields
from services.scheduler.store.outcomes import Requeued

# ARGV: prefix, id, vendor
# Back to QUEUED with fresh retries, at its old place in its queue; no longer expiring.
# Returns a Requeued: REQUEUED_NOT_FOUND (not the vendor's dead letter),
# REQUEUED_INPUT_GONE (purged or expired), REQUEUED_REQUEUED.
REQUEUE_DEAD = r"""
local id, vendor = ARGV[2], ARGV[3]
local jk = key.job(id)
local st = redis.call('HMGET', jk, 'vendor', 'dead_lettered', 'score')
if st[1] ~= vendor or st[2] ~= '1' then return REQUEUED_NOT_FOUND end
if redis.call('EXISTS', key.input(id)) == 0 then return REQUEUED_INPUT_GONE end
redis.call('ZREM', key.dead_letters(vendor), id)
redis.call('PERSIST', jk)
redis.call('PERSIST', key.events(id))
redis.call('PERSIST', key.input(id))
redis.call('HDEL', jk, 'error', 'end_ms')
local now = now_ms()
redis.call('HSET', jk, 'state', STATE_QUEUED, 'stage', STAGE_QUEUED, 'progress', 0, 'node', '',
  'attempt', 0, 'free_attempts', 0, 'dead_lettered', 0, 'update_ms', now)
event(id, 'state', STATE_QUEUED, 'stage', STAGE_QUEUED, 'progress', 0, 'node', '', 'attempt', 0,
  'dead_lettered', 0, 'error', '', 'update_ms', now)
local batch = redis.call('HGET', jk, 'batch')
if batch and batch ~= '' then  -- open again: its batch.completed is due again when it ends
  redis.call('HINCRBY', key.batch_open(), vendor .. '/' .. batch, 1)
end
enqueue_ready(id, vendor, tonumber(st[3]))
return REQUEUED_REQUEUED
"""

# ARGV: prefix, vendor, id...
# Drops the named dead letters of the vendor: input deleted, job stays FAILED.
# Returns how many of them were the vendor's dead letters.
PURGE_DEAD = r"""
local vendor = ARGV[2]
local purged = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('ZREM', key.dead_letters(vendor), id) == 1 then
    redis.call('DEL', key.input(id))
    redis.call('HSET', key.job(id), 'dead_lettered', 0)
    event(id, 'dead_lettered', 0)
    purged = purged + 1
  end
end
return purged
"""

_PURGE_CHUNK = 500  # ids per script call: bounds how long one call blocks Redis


class DeadLetters:
    def __init__(self, redis: aioredis.Redis, keys: Keys, jobs: Jobs) -> None:
        self.redis = redis
        self.keys = keys
        self.jobs = jobs
        self._requeue = lua.load(redis, REQUEUE_DEAD)
        self._purge = lua.load(redis, PURGE_DEAD)

    async def page(
        self, vendor: str, page_size: int, page_token: str
    ) -> tuple[list[jobs_pb2.Job], str]:
        """Most recently dead-lettered first; the token is the offset."""
        start = int(page_token or 0)
        key = self.keys.dead_letters(vendor)
        ids = cast(list[bytes], await self.redis.zrevrange(key, start, start + page_size - 1))
        jobs: list[jobs_pb2.Job] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            for member in ids:
                pipe.hgetall(self.keys.job(member.decode()))
            rows = cast(list[Fields], await pipe.execute())
        for member, fields in zip(ids, rows, strict=True):
            if fields:
                jobs.append(job_from_fields(member.decode(), fields))
            else:
                await self.redis.zrem(key, member)  # expired with its job
        more = len(ids) == page_size and await self.redis.zcard(key) > start + page_size
        return jobs, str(start + page_size) if more else ""

    async def requeue(self, vendor: str, job_id: str) -> jobs_pb2.Job:
        """Put the vendor's dead letter back in its queue with fresh retries."""
        got = Requeued(int(await self._requeue(args=[self.keys.prefix, job_id, vendor])))
        if got == Requeued.NOT_FOUND:
            raise not_found(f"dead letter {job_name(job_id)}")
        if got == Requeued.INPUT_GONE:
            raise CutoutError(
                f"{job_name(job_id)} cannot be requeued: its input has expired",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        return await self.jobs.get(vendor, job_id)

    async def purge(self, vendor: str, job_ids: list[str] | None) -> int:
        """Purge the named dead letters, or all of the vendor's when job_ids is None."""
        if job_ids is None:
            members = await self.redis.zrange(self.keys.dead_letters(vendor), 0, -1)
            job_ids = [m.decode() for m in cast(list[bytes], members)]
        purged = 0
        for start in range(0, len(job_ids), _PURGE_CHUNK):
            chunk = job_ids[start : start + _PURGE_CHUNK]
            purged += int(await self._purge(args=[self.keys.prefix, vendor, *chunk]))
        return purged
