"""Batches: the jobs of one SubmitBatch (`batch` sets, filled by ENQUEUE), counted, cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import cast

import redis.asyncio as aioredis

from cutout.v1 import jobs_pb2
from services.common.errors import not_found
from services.scheduler.keys import Keys
from services.scheduler.store.cancellation import Cancellation
from services.scheduler.store.outcomes import Cancelled

_UNFINISHED = (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING)


class Batches:
    def __init__(self, redis: aioredis.Redis, keys: Keys, cancellation: Cancellation) -> None:
        self.redis = redis
        self.keys = keys
        self.cancellation = cancellation

    async def _members(self, vendor: str, batch: str) -> list[str]:
        members = cast(set[bytes], await self.redis.smembers(self.keys.batch(vendor, batch)))
        if not members:
            raise not_found(batch)  # another vendor's batch is no batch at all
        return [m.decode() for m in members]

    async def progress(self, vendor: str, batch: str) -> jobs_pb2.BatchProgress:
        """Counts by state and mean progress of the vendor's batch; NOT_FOUND otherwise."""
        members = await self._members(vendor, batch)
        async with self.redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.hmget(self.keys.job(member), "state", "progress")
            rows = cast(list[list[bytes | None]], await pipe.execute())
        out = jobs_pb2.BatchProgress(name=batch)
        percent = 0
        for state_raw, progress_raw in rows:
            if state_raw is None:
                continue  # expired
            state = int(state_raw)
            out.total += 1
            if state == jobs_pb2.JOB_STATE_QUEUED:
                out.queued += 1
            elif state == jobs_pb2.JOB_STATE_RUNNING:
                out.running += 1
            elif state == jobs_pb2.JOB_STATE_SUCCEEDED:
                out.succeeded += 1
            elif state == jobs_pb2.JOB_STATE_FAILED:
                out.failed += 1
            else:
                out.cancelled += 1
            percent += int(progress_raw or 0) if state in _UNFINISHED else 100
        out.done = out.queued + out.running == 0
        out.progress_percent = percent // out.total if out.total else 100
        return out

    async def watch(
        self, vendor: str, batch: str, poll_s: float = 0.5
    ) -> AsyncIterator[jobs_pb2.BatchProgress]:
        """The batch's progress now, then again whenever it changes, until it is done."""
        last: jobs_pb2.BatchProgress | None = None
        while True:
            now = await self.progress(vendor, batch)
            if now != last:
                yield now
                last = now
            if now.done:
                return
            await asyncio.sleep(poll_s)

    async def cancel(self, vendor: str, batch: str) -> tuple[int, jobs_pb2.BatchProgress]:
        """Cancel every unfinished job of the batch; (how many were cancelled, progress)."""
        cancelled = 0
        for job_id in await self._members(vendor, batch):
            outcome = await self.cancellation.cancel_one(vendor, job_id)
            cancelled += outcome == Cancelled.CANCELLED
        return cancelled, await self.progress(vendor, batch)
