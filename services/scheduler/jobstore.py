"""Jobs in Redis: the only code that reads or changes them.

Every change is one Lua script from scripts.py; reads are plain commands.
The store knows nothing about gRPC servers or nodes.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import redis.asyncio as aioredis
from google.rpc import status_pb2
from redis.typing import EncodableT

from cutout.names import job_name
from cutout.v1 import jobs_pb2
from services.common import operations
from services.common.errors import CutoutError, not_found, status_from_code
from services.scheduler import metrics
from services.scheduler.keys import PRIORITY_BAND, Keys, job_cost
from services.scheduler.scripts import (
    CANCEL,
    CLAIM,
    COMPLETE,
    ENQUEUE,
    FAIL,
    PROGRESS,
    PROMOTE,
    PURGE_DEAD,
    REAP,
    REQUEUE_DEAD,
    RETRY,
)

TERMINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
Fields = dict[bytes, bytes]
# Hash fields that events change, and their values when a job is submitted.
_INITIAL: Fields = {
    b"state": b"1",
    b"stage": b"1",
    b"progress": b"0",
    b"node": b"",
    b"attempt": b"0",
    b"dead_lettered": b"0",
    b"retry_ms": b"0",
}
_EVENT_FIELDS = frozenset([*_INITIAL, b"result", b"error", b"update_ms"])


@dataclass(frozen=True)
class Claim:
    """A job leased to one node for one attempt."""

    job_id: str
    attempt: int
    vendor: str
    operation: bytes = b""  # serialized jobs_pb2.Operation
    image: bytes | None = None  # None: the input is gone (the job was cancelled)
    record: bytes = b""  # serialized jobs_pb2.RecordRef, empty when the job names none
    created_ms: int = 0  # when the job was submitted (ms since the epoch)


@dataclass(frozen=True)
class RetryPolicy:
    """Retryable failures wait base * 2^(n-1) (+/- jitter) before attempt n+1;
    after max_retries retries the job is dead-lettered."""

    max_retries: int = 3
    base_delay_ms: int = 2000
    jitter: float = 0.2

    def jitter_factor(self) -> float:
        # Lua's math.random is seeded identically on every call, so the
        # randomness comes from here.
        return random.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True)
class Fairness:
    """Weighted deficit round robin: each turn a vendor gets quantum * weight
    milli-megapixels of credit (see scripts.CLAIM)."""

    quantum_milli: int = 1000
    weights: dict[str, float] = field(default_factory=dict)
    default_weight: float = 1.0


@dataclass(frozen=True)
class Retention:
    """How long finished jobs stay readable (seconds)."""

    finished_s: int = 7 * 24 * 3600
    idempotency_s: int = 24 * 3600


def _ms_to_ts(ms: int, ts: Any) -> None:
    ts.FromMilliseconds(ms)


@dataclass(frozen=True)
class Admission:
    """Caps on waiting jobs, checked atomically at enqueue."""

    max_queued_per_vendor: int = 10_000
    max_queued: int = 100_000
    retry_after_s: float = 5.0


@dataclass(frozen=True)
class NewJob:
    """A validated submission to store and queue."""

    vendor: str
    submission: jobs_pb2.JobSubmission
    image: bytes
    input_pixels: int
    batch: str = ""


@dataclass(frozen=True)
class Place:
    """Where a queued job stands: its position and the estimated wait (ms, None unknown)."""

    position: int = 0
    wait_ms: int | None = None


def estimate_wait_ms(position: int, capacity: int, active_vendors: int, run_ms: float) -> int:
    """Rounds of the fleet the jobs ahead need, times the average run time.

    Under contention deficit round robin gives each waiting vendor about an
    equal share of the fleet's slots, so a vendor's queue drains at
    capacity / active_vendors jobs per run time.
    """
    share = max(1.0, capacity / max(1, active_vendors))
    return int(-(-position // share) * run_ms)


def job_from_fields(job_id: str, f: Fields, place: Place = Place()) -> jobs_pb2.Job:
    """Build the API's Job from the hash fields (or hash fields plus events)."""
    state = int(f.get(b"state", b"0"))
    job = jobs_pb2.Job(
        name=job_name(job_id),
        state=state,  # type: ignore[arg-type]
        done=state in TERMINAL,
        priority=int(f.get(b"priority", b"0")),
        client_key=f.get(b"client_key", b"").decode(),
        batch=f.get(b"batch", b"").decode(),
        stage=int(f.get(b"stage", b"0")),  # type: ignore[arg-type]
        progress_percent=int(f.get(b"progress", b"0")),
        node=f.get(b"node", b"").decode(),
        attempt=int(f.get(b"attempt", b"0")),
        input_pixels=int(f.get(b"input_pixels", b"0")),
        queue_position=place.position if state == jobs_pb2.JOB_STATE_QUEUED else 0,
    )
    if state == jobs_pb2.JOB_STATE_QUEUED and place.position and place.wait_ms is not None:
        job.estimated_wait.FromMilliseconds(place.wait_ms)
    job.operation.ParseFromString(f.get(b"operation", b""))
    job.dead_lettered = f.get(b"dead_lettered") == b"1"
    retry_ms = int(f.get(b"retry_ms") or b"0")
    if state == jobs_pb2.JOB_STATE_QUEUED and retry_ms > time.time() * 1000:
        job.retry_time.FromMilliseconds(retry_ms)
    if f.get(b"record"):
        job.record.ParseFromString(f[b"record"])
    _ms_to_ts(int(f.get(b"create_ms", b"0")), job.create_time)
    _ms_to_ts(int(f.get(b"update_ms", b"0")), job.update_time)
    if state == jobs_pb2.JOB_STATE_SUCCEEDED and f.get(b"result"):
        job.result.ParseFromString(f[b"result"])
    elif state in (jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED) and f.get(b"error"):
        job.error.ParseFromString(f[b"error"])
    return job


class JobStore:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        retention: Retention,
        retries: RetryPolicy | None = None,
        fairness: Fairness | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.admission = admission or Admission()
        self.redis = redis
        self.keys = keys
        self.retention = retention
        self.retries = retries or RetryPolicy()
        self.fairness = fairness or Fairness()
        # Concurrent jobs the fleet can take, for ETAs; the scheduler wires in its node pool.
        # Slots of the healthy nodes for a lane ('' inference, 'light:' light jobs).
        self.fleet_capacity: Callable[[str], int] = lambda lane: 1
        self._enqueue = redis.register_script(ENQUEUE)
        self._claim = redis.register_script(CLAIM)
        self._progress = redis.register_script(PROGRESS)
        self._complete = redis.register_script(COMPLETE)
        self._fail = redis.register_script(FAIL)
        self._retry = redis.register_script(RETRY)
        self._reap = redis.register_script(REAP)
        self._cancel = redis.register_script(CANCEL)
        self._promote = redis.register_script(PROMOTE)
        self._requeue_dead = redis.register_script(REQUEUE_DEAD)
        self._purge_dead = redis.register_script(PURGE_DEAD)

    # --- submission -------------------------------------------------------

    async def enqueue(
        self,
        vendor: str,
        submission: jobs_pb2.JobSubmission,
        image: bytes,
        input_pixels: int,
        batch: str = "",
    ) -> tuple[jobs_pb2.Job, bool]:
        """Store and queue a job. Returns (job, deduplicated)."""
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
                await self._enqueue(args=self._enqueue_args(new), client=pipe)
            replies = await pipe.execute(raise_on_error=True)
        return [self._enqueued(new, reply) for new, reply in zip(jobs, replies, strict=True)]

    def _enqueue_args(self, new: NewJob) -> list[EncodableT]:
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
            operations.lane(sub.operation),
            self.retention.finished_s + 24 * 3600,
        ]

    def _enqueued(self, new: NewJob, reply: list[Any]) -> tuple[jobs_pb2.Job, bool] | CutoutError:
        code, got = int(reply[0]), reply[1]
        if code < 0:  # over an admission cap: -1 the vendor's, -2 the cluster's
            what = {
                -1: f"vendor {new.vendor} already has {got.decode()} jobs "
                "waiting; retry once some have started",
                -2: f"the cluster has {self.admission.max_queued} jobs waiting and sheds load; "
                "retry shortly",
            }[code]
            metrics.ADMISSION_REFUSALS.labels("vendor" if code == -1 else "cluster").inc()
            return CutoutError(
                what, grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after_s=self.admission.retry_after_s
            )
        flat, rank, active, run_ms = reply[2], reply[3], reply[4], reply[5]
        fields: Fields = dict(zip(flat[::2], flat[1::2], strict=True))
        lane = fields.get(b"lane", b"").decode()
        place = Place()
        if rank is not None:
            position = int(rank) + 1
            wait = None
            if run_ms is not None:
                wait = estimate_wait_ms(
                    position, self.fleet_capacity(lane), int(active), float(run_ms)
                )
            place = Place(position, wait)
        metrics.JOBS_ENQUEUED.labels("deduplicated" if code == 0 else "queued").inc()
        return job_from_fields(got.decode(), fields, place), code == 0

    # --- reads --------------------------------------------------------------

    async def _fields(self, vendor: str, job_id: str) -> Fields:
        fields = cast(Fields, await self.redis.hgetall(self.keys.job(job_id)))
        if not fields or fields.get(b"vendor", b"").decode() != vendor:
            # Another vendor's job is indistinguishable from no job at all.
            raise not_found(f"job {job_name(job_id)}")
        return fields

    async def place(self, vendor: str, job_id: str, lane: str = "") -> Place:
        """Position in the vendor's queue of the job's lane, and an ETA."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrank(self.keys.queue(vendor, lane), job_id)
            pipe.scard(self.keys.ring_members_of(lane))
            pipe.hget(self.keys.eta, f"{lane}run_ms")
            rank, active, run_ms = await pipe.execute()
        if rank is None:
            return Place()
        position = int(rank) + 1
        if run_ms is None:
            return Place(position)
        wait = estimate_wait_ms(position, self.fleet_capacity(lane), int(active), float(run_ms))
        return Place(position, wait)

    async def get(self, vendor: str, job_id: str) -> jobs_pb2.Job:
        fields = await self._fields(vendor, job_id)
        place = Place()
        if int(fields[b"state"]) == jobs_pb2.JOB_STATE_QUEUED:
            place = await self.place(vendor, job_id, fields.get(b"lane", b"").decode())
        return job_from_fields(job_id, fields, place)

    async def input_image(self, job_id: str) -> bytes | None:
        return cast("bytes | None", await self.redis.get(self.keys.input(job_id)))

    async def watch(
        self, vendor: str, job_id: str, poll_s: float = 1.0
    ) -> AsyncIterator[jobs_pb2.Job]:
        """Yield the job after each change it went through, from its submission on,
        then after every new change, until it is done.

        History and stream position are read in one transaction, so no change
        is missed or repeated however late the watcher arrives.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
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
            job = await self._apply(vendor, job_id, state, data)
            yield job
        block_ms = max(1, int(poll_s * 1000))
        while not job.done:
            stream = {self.keys.events(job_id): last_id}
            got = cast(list[Any], await self.redis.xread(stream, block=block_ms, count=64))  # type: ignore[arg-type]
            if not got:
                if not await self.redis.exists(self.keys.job(job_id)):
                    return  # expired while watched
                if job.state == jobs_pb2.JOB_STATE_QUEUED:
                    # Nothing happened to this job, but jobs ahead of it may have left.
                    place = await self.place(vendor, job_id, state.get(b"lane", b"").decode())
                    if place.position != job.queue_position:
                        job = job_from_fields(job_id, state, place)
                        yield job
                continue
            for entry_id, data in got[0][1]:
                last_id = entry_id
                job = await self._apply(vendor, job_id, state, data)
                yield job

    # --- batches ----------------------------------------------------------------

    async def batch_progress(self, vendor: str, batch: str) -> jobs_pb2.BatchProgress:
        """Counts by state and mean progress of the vendor's batch; NOT_FOUND otherwise."""
        members = cast(set[bytes], await self.redis.smembers(self.keys.batch(vendor, batch)))
        if not members:
            raise not_found(batch)
        async with self.redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.hmget(self.keys.job(member.decode()), "state", "progress")
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
            finished = state not in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING)
            percent += 100 if finished else int(progress_raw or 0)
        out.done = out.queued + out.running == 0
        out.progress_percent = percent // out.total if out.total else 100
        return out

    async def watch_batch(
        self, vendor: str, batch: str, poll_s: float = 0.5
    ) -> AsyncIterator[jobs_pb2.BatchProgress]:
        """The batch's progress now, then again whenever it changes, until it is done."""
        last: jobs_pb2.BatchProgress | None = None
        while True:
            now = await self.batch_progress(vendor, batch)
            if now != last:
                yield now
                last = now
            if now.done:
                return
            await asyncio.sleep(poll_s)

    async def cancel_batch(self, vendor: str, batch: str) -> tuple[int, jobs_pb2.BatchProgress]:
        members = cast(set[bytes], await self.redis.smembers(self.keys.batch(vendor, batch)))
        if not members:
            raise not_found(batch)
        cancelled = 0
        for member in members:
            cancelled += await self._cancel_one(vendor, member.decode()) == 1
        return cancelled, await self.batch_progress(vendor, batch)

    async def _apply(self, vendor: str, job_id: str, state: Fields, event: Fields) -> jobs_pb2.Job:
        state.update(event)
        place = Place()
        if int(state[b"state"]) == jobs_pb2.JOB_STATE_QUEUED:
            place = await self.place(vendor, job_id, state.get(b"lane", b"").decode())
        return job_from_fields(job_id, state, place)

    async def page(
        self, vendor: str, state: int, page_size: int, page_token: str
    ) -> tuple[list[jobs_pb2.Job], str]:
        """Newest first; the token is the sequence number to continue below."""
        upper = f"({int(page_token)}" if page_token else "+inf"
        jobs: list[jobs_pb2.Job] = []
        key = self.keys.vendor_jobs(vendor)
        scanned = 0
        while len(jobs) < page_size and scanned < 10_000:
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
                    await self.redis.zrem(key, member)  # expired: drop from the index
                    continue
                if state and int(fields[b"state"]) != state:
                    continue
                jobs.append(job_from_fields(member.decode(), fields))
                if len(jobs) == page_size:
                    return jobs, upper[1:]
        return jobs, upper[1:] if jobs else ""

    async def stats(self, vendor: str) -> jobs_pb2.QueueStats:
        vendors = (
            [vendor]
            if vendor
            else sorted(
                v.decode() for v in cast(set[bytes], await self.redis.smembers(self.keys.vendors))
            )
        )
        stats = jobs_pb2.QueueStats()
        by_priority = [0] * 10
        async with self.redis.pipeline(transaction=False) as pipe:
            for v in vendors:
                pipe.scard(self.keys.running(v))
                pipe.hgetall(self.keys.counters(v))
                for p in range(10):
                    low = (9 - p) * PRIORITY_BAND
                    for lane in operations.LANES:
                        pipe.zcount(self.keys.queue(v, lane), low, f"({low + PRIORITY_BAND}")
            rows = await pipe.execute()
        per_vendor = 2 + 10 * len(operations.LANES)
        for i in range(len(vendors)):
            chunk = rows[i * per_vendor : (i + 1) * per_vendor]
            stats.running += int(chunk[0])
            counts = {k.decode(): int(n) for k, n in chunk[1].items()}
            stats.attempts_started += counts.get("attempts", 0)
            stats.lease_losses += counts.get("lease_lost", 0)
            stats.retries += counts.get("retried", 0)
            stats.dead_lettered += counts.get("dead_lettered", 0)
            stats.succeeded += counts.get("succeeded", 0)
            stats.failed += counts.get("failed", 0)
            for p in range(10):
                lanes = chunk[2 + p * len(operations.LANES) : 2 + (p + 1) * len(operations.LANES)]
                by_priority[p] += sum(int(n) for n in lanes)
        stats.queued = sum(by_priority)
        for p in range(9, -1, -1):
            if by_priority[p]:
                stats.by_priority.add(priority=p, queued=by_priority[p])
        return stats

    # --- dispatch -------------------------------------------------------------

    async def claim(self, node: str, lease_ms: int, lane: str = "") -> Claim | None:
        """Lease the next job of the lane ('' inference, 'light:' light jobs) to node."""
        got = await self._claim(
            args=[
                self.keys.prefix,
                node,
                lease_ms,
                self.fairness.quantum_milli,
                self.fairness.default_weight,
                lane,
            ]
        )
        if not got:
            return None
        return Claim(
            job_id=got[0].decode(),
            attempt=int(got[1]),
            vendor=got[2].decode(),
            operation=got[3],
            image=got[4],
            record=got[5],
            created_ms=int(got[6]),
        )

    async def publish_weights(self) -> None:
        """Store the configured vendor weights where the claim script reads them."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.weights)
            if self.fairness.weights:
                pipe.hset(self.keys.weights, mapping=cast(Any, dict(self.fairness.weights)))
            await pipe.execute()

    async def progress(
        self, claim: Claim, updates: Sequence[tuple[int, int]], lease_ms: int
    ) -> bool:
        """Record (stage, percent) updates in order and renew the lease.

        False when the attempt is fenced off (cancelled, or re-leased elsewhere).
        """
        ok = await self._progress(args=self._progress_args(claim, updates, lease_ms))
        return bool(ok)

    def _progress_args(
        self, claim: Claim, updates: Sequence[tuple[int, int]], lease_ms: int
    ) -> list[EncodableT]:
        args: list[EncodableT] = [self.keys.prefix, claim.job_id, claim.attempt, lease_ms]
        for stage, percent in updates:
            args += [stage, percent]
        return args

    async def renew(self, claim: Claim, lease_ms: int) -> bool:
        return await self.progress(claim, (), lease_ms)

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
        async with self.redis.pipeline(transaction=False) as pipe:
            if updates:
                await self._progress(
                    args=self._progress_args(claim, updates, lease_ms), client=pipe
                )
            # The output lives as long as the job record; registered even when
            # the fence below refuses, so a lost attempt's output is swept too.
            deadline = int((time.time() + self.retention.finished_s) * 1000)
            pipe.zadd(self.keys.blobs, {result.uri: deadline})
            await self._complete(
                args=[
                    self.keys.prefix,
                    claim.job_id,
                    claim.attempt,
                    result.SerializeToString(),
                    self.retention.finished_s,
                    1 if deliver else 0,
                ],
                client=pipe,
            )
            replies = await pipe.execute()
        return bool(replies[-1])

    # --- retention of stored outputs ----------------------------------------------

    async def expired_blobs(self, limit: int = 100) -> list[str]:
        due = await self.redis.zrangebyscore(
            self.keys.blobs, "-inf", int(time.time() * 1000), start=0, num=limit
        )
        return [b.decode() for b in cast(list[bytes], due)]

    async def forget_blobs(self, uris: list[str]) -> None:
        if uris:
            await self.redis.zrem(self.keys.blobs, *uris)

    async def fail(self, claim: Claim, error: status_pb2.Status) -> bool:
        ok = await self._fail(
            args=[
                self.keys.prefix,
                claim.job_id,
                claim.attempt,
                error.SerializeToString(),
                self.retention.finished_s,
            ]
        )
        return bool(ok)

    async def retry(self, claim: Claim, error: status_pb2.Status, refund: bool = False) -> int:
        """Back off and retry, or dead-letter once the retries are used up.

        refund: the node refused the attempt before starting it: requeue at
        once without counting it. Returns 1 retrying, 2 dead-lettered,
        3 requeued (refund), 0 fenced off.
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
                int(refund),
            ]
        )
        return int(got)

    async def reap(self, limit: int = 100) -> list[str]:
        """Retry (or dead-letter) jobs whose lease expired; returns their ids."""
        error = status_from_code(
            grpc.StatusCode.UNAVAILABLE,
            "the node or scheduler running this job stopped answering (lease expired)",
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
            ]
        )
        return [g.decode() for g in got]

    async def promote(self, limit: int = 500) -> int:
        """Put jobs whose backoff is over back in their queues; returns how many."""
        return int(await self._promote(args=[self.keys.prefix, limit]))

    # --- dead letters -------------------------------------------------------------

    async def dead_letters(
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

    async def requeue_dead_letter(self, vendor: str, job_id: str) -> jobs_pb2.Job:
        got = int(await self._requeue_dead(args=[self.keys.prefix, job_id, vendor]))
        if got == -1:
            raise not_found(f"dead letter {job_name(job_id)}")
        if got == -2:
            raise CutoutError(
                f"{job_name(job_id)} cannot be requeued: its input has expired",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        return await self.get(vendor, job_id)

    async def purge_dead_letters(self, vendor: str, job_ids: list[str] | None) -> int:
        """Purge the named dead letters, or all of the vendor's when job_ids is None."""
        if job_ids is None:
            members = await self.redis.zrange(self.keys.dead_letters(vendor), 0, -1)
            job_ids = [m.decode() for m in cast(list[bytes], members)]
        purged = 0
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start : start + 500]
            purged += int(await self._purge_dead(args=[self.keys.prefix, vendor, *chunk]))
        return purged

    async def _cancel_one(self, vendor: str, job_id: str) -> int:
        """-1 not the vendor's job, 0 already finished, 1 cancelled now."""
        error = status_from_code(grpc.StatusCode.CANCELLED, "cancelled by the vendor")
        args = [self.keys.prefix, job_id, vendor, error.SerializeToString()]
        return int(await self._cancel(args=[*args, self.retention.finished_s]))

    async def cancel(self, vendor: str, job_id: str) -> jobs_pb2.Job:
        if await self._cancel_one(vendor, job_id) == -1:
            raise not_found(f"job {job_name(job_id)}")
        return await self.get(vendor, job_id)


def ensure_succeeded(job: jobs_pb2.Job) -> None:
    if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        state = jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
        raise CutoutError(
            f"{job.name} is {state}; a result exists only once it has SUCCEEDED",
            grpc.StatusCode.FAILED_PRECONDITION,
        )
