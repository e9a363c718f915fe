"""Cancellation by the vendor: a waiting job leaves its queue, a running one is fenced off.

A running job's dispatcher hears of it on the `cancel` channel and cancels
the node call; the attempt's late answer then changes nothing.
"""

from __future__ import annotations

import grpc
import redis.asyncio as aioredis

from cutout.names import job_name
from cutout.v1 import jobs_pb2
from services.common.errors import not_found, status_from_code
from services.scheduler.keys import Keys
from services.scheduler.store import lua
from services.scheduler.store.jobs import Jobs
from services.scheduler.store.model import Retention
from services.scheduler.store.outcomes import Cancelled

# ARGV: prefix, id, vendor, error, retention_s
# CANCELLED with the error, input freed. Returns a Cancelled: CANCELLED_NOT_FOUND
# (no such job, or another vendor's), CANCELLED_ALREADY_DONE, CANCELLED_CANCELLED.
CANCEL = r"""
local id, vendor = ARGV[2], ARGV[3]
local st = redis.call('HMGET', key.job(id), 'state', 'vendor', 'progress')
if not st[1] or st[2] ~= vendor then return CANCELLED_NOT_FOUND end
if state_is(st[1], STATE_QUEUED) then
  local lane = lane_of(id)
  local qk = key.queue(lane, vendor)
  redis.call('ZREM', qk, id)
  redis.call('ZREM', key.delayed(), id)
  if redis.call('ZCARD', qk) == 0 then leave_ring(lane, vendor) end
elseif state_is(st[1], STATE_RUNNING) then
  leave_running(id, vendor)
  redis.call('PUBLISH', key.cancel_channel(), id)
else
  return CANCELLED_ALREADY_DONE
end
finish_and_free(id, STATE_CANCELLED, tonumber(st[3]), 'error', ARGV[4], tonumber(ARGV[5]))
return CANCELLED_CANCELLED
"""


class Cancellation:
    def __init__(self, redis: aioredis.Redis, keys: Keys, retention: Retention, jobs: Jobs) -> None:
        self.keys = keys
        self.retention = retention
        self.jobs = jobs
        self._cancel = lua.load(redis, CANCEL)

    async def cancel_one(self, vendor: str, job_id: str) -> Cancelled:
        error = status_from_code(grpc.StatusCode.CANCELLED, "cancelled by the vendor")
        args = [self.keys.prefix, job_id, vendor, error.SerializeToString()]
        return Cancelled(int(await self._cancel(args=[*args, self.retention.finished_s])))

    async def cancel(self, vendor: str, job_id: str) -> jobs_pb2.Job:
        """Cancel the vendor's job unless it is done; the job as it is now. NOT_FOUND otherwise."""
        if await self.cancel_one(vendor, job_id) == Cancelled.NOT_FOUND:
            raise not_found(f"job {job_name(job_id)}")
        return await self.jobs.get(vendor, job_id)
