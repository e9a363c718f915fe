"""Reading jobs: one job, its place in the queue and ETA, its history as a watch, a vendor's list.

Reads only: plain commands, no script. Changes belong to the other modules.
A watch replays the history itself and then follows the job through the
process's watch hub (watch_hub.py), which reads every watched stream on one
connection of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import redis.asyncio as aioredis

from cutout.names import job_name
from cutout.v1 import jobs_pb2
from services.common.errors import not_found
from services.common.operations import Lane
from services.scheduler.keys import Keys
from services.scheduler.store.model import (
    Fields,
    FleetCapacity,
    Place,
    job_from_fields,
    place_of,
)
from services.scheduler.store.watch_hub import WatchHub

# Hash fields that events change, and their values when a job is submitted.
_INITIAL: Fields = {
    b"state": str(jobs_pb2.JOB_STATE_QUEUED).encode(),
    b"stage": str(jobs_pb2.STAGE_QUEUED).encode(),
    b"progress": b"0",
    b"node": b"",
    b"attempt": b"0",
    b"dead_lettered": b"0",
    b"retry_ms": b"0",
}
_EVENT_FIELDS = frozenset([*_INITIAL, b"result", b"error", b"update_ms"])
_SCAN_LIMIT = 10_000  # jobs one ListJobs page may skip over (other states, expired)


class Jobs:
    def __init__(self, redis: aioredis.Redis, keys: Keys, fleet_capacity: FleetCapacity) -> None:
        self.redis = redis
        self.keys = keys
        self.fleet_capacity = fleet_capacity
        self.hub = WatchHub(redis, keys, fleet_capacity)

    async def _fields(self, vendor: str, job_id: str) -> Fields:
        fields = cast(Fields, await self.redis.hgetall(self.keys.job(job_id)))
        if not fields or fields.get(b"vendor", b"").decode() != vendor:
            # Another vendor's job is indistinguishable from no job at all.
            raise not_found(f"job {job_name(job_id)}")
        return fields

    async def get(self, vendor: str, job_id: str) -> jobs_pb2.Job:
        """The vendor's job; NOT_FOUND when there is none (or it is another vendor's)."""
        fields = await self._fields(vendor, job_id)
        place = Place()
        if int(fields[b"state"]) == jobs_pb2.JOB_STATE_QUEUED:
            place = await self.place(vendor, job_id, Lane.parse(fields.get(b"lane")))
        return job_from_fields(job_id, fields, place)

    async def place(
        self,
        vendor: str,
        job_id: str,
        lane: Lane = Lane.HEAVY,
        client: aioredis.Redis | None = None,
    ) -> Place:
        """Position in the vendor's queue of the job's lane, and an ETA."""
        async with (client or self.redis).pipeline(transaction=False) as pipe:
            pipe.zrank(self.keys.queue(vendor, lane), job_id)
            pipe.scard(self.keys.ring_members(lane))
            pipe.hget(self.keys.eta, f"{lane}run_ms")
            rank, active, run_ms = await pipe.execute()
        return place_of(rank, int(active), run_ms, self.fleet_capacity(lane))

    async def input_image(self, job_id: str) -> bytes | None:
        return cast("bytes | None", await self.redis.get(self.keys.input(job_id)))

    async def watch(self, vendor: str, job_id: str) -> AsyncIterator[jobs_pb2.Job]:
        """Yield the job after each change it went through, from its submission on,
        then after every new change, until it is done.

        History and stream position are read in one transaction, so no change
        is missed or repeated however late the watcher arrives. A late watcher
        also replays changes made after the job was done (a delayed upload's URL).
        While the job waits, a change of its place in the queue is a change too.
        """
        async with (
            self.hub.session() as reads,
            contextlib.aclosing(self._watch(vendor, job_id, reads)) as jobs,
        ):
            async for job in jobs:
                yield job

    async def _watch(
        self, vendor: str, job_id: str, reads: aioredis.Redis
    ) -> AsyncGenerator[jobs_pb2.Job, None]:
        async with reads.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.keys.job(job_id))
            pipe.xrange(self.keys.events(job_id))
            fields, history = await pipe.execute()
        if not fields or fields.get(b"vendor", b"").decode() != vendor:
            raise not_found(f"job {job_name(job_id)}")
        # Replay from the fields every job starts with; the events carry the rest.
        state = {k: v for k, v in fields.items() if k not in _EVENT_FIELDS}
        state.update(_INITIAL)
        last_id = b"0-0"
        job = job_from_fields(job_id, state)
        if not history:
            yield job
        for entry_id, data in history:
            last_id = entry_id
            job = await self._apply(vendor, job_id, state, data, reads)
            yield job
        if job.done:
            return
        lane = Lane.parse(state.get(b"lane"))
        async with self.hub.subscribe(vendor, job_id, lane, last_id) as followed:
            while not job.done:
                followed.queued = job.state == jobs_pb2.JOB_STATE_QUEUED
                update = await followed.next()
                if update.gone:
                    return  # expired while watched
                for data in update.events:
                    job = await self._apply(vendor, job_id, state, data, reads)
                    yield job
                place = update.place
                if place is not None and not update.events and followed.queued:
                    # Nothing happened to this job, but jobs ahead of it may have left.
                    if place.position != job.queue_position:
                        job = job_from_fields(job_id, state, place)
                        yield job

    async def _apply(
        self, vendor: str, job_id: str, state: Fields, event: Fields, reads: aioredis.Redis
    ) -> jobs_pb2.Job:
        state.update(event)
        place = Place()
        if int(state[b"state"]) == jobs_pb2.JOB_STATE_QUEUED:
            place = await self.place(vendor, job_id, Lane.parse(state.get(b"lane")), reads)
        return job_from_fields(job_id, state, place)

    async def page(
        self, vendor: str, state: int, page_size: int, page_token: str
    ) -> tuple[list[jobs_pb2.Job], str]:
        """Newest first; the token is the sequence number to continue below."""
        upper = f"({int(page_token)}" if page_token else "+inf"
        jobs: list[jobs_pb2.Job] = []
        key = self.keys.vendor_jobs(vendor)
        scanned = 0
        while len(jobs) < page_size and scanned < _SCAN_LIMIT:
            batch = cast(
                list[tuple[bytes, float]],
                await self.redis.zrevrangebyscore(
                    key, upper, "-inf", start=0, num=200, withscores=True
                ),
            )
            if not batch:
                return jobs, ""
            async with self.redis.pipeline(transaction=False) as pipe:
                for member, _ in batch:
                    pipe.hgetall(self.keys.job(member.decode()))
                rows = cast(list[Fields], await pipe.execute())
            for (member, score), fields in zip(batch, rows, strict=True):
                scanned += 1
                upper = f"({int(score)}"
                if not fields:
                    # Expired: drop it from the index. ZREM of what is gone is idempotent.
                    await self.redis.zrem(key, member)
                    continue
                if state and int(fields[b"state"]) != state:
                    continue
                jobs.append(job_from_fields(member.decode(), fields))
                if len(jobs) == page_size:
                    return jobs, upper[1:]
        return jobs, upper[1:] if jobs else ""
