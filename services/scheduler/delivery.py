"""Delivers succeeded jobs: the remote upload that failed inline, then the record update.

A job that succeeds with something still to deliver is queued in the
`deliveries` outbox by the same Lua script that marks it SUCCEEDED, so the
work is never lost between the two. Any scheduler replica leases due
deliveries in groups, uploads outputs still waiting in the local store to
the vendor's remote store (replacing the job's result URI with the remote
URL), then writes the group's record updates in as few statements as fit
under the database's packet limit. What fails is retried with backoff,
forever, until the job's retention ends: a storage or database outage
delays a delivery, never drops it, and never turns a job FAILED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

import redis.asyncio as aioredis

from cutout.v1 import jobs_pb2
from services.scheduler import metrics
from services.scheduler.keys import Keys
from services.scheduler.records import RecordsUnavailable, RecordUpdate, RecordWriter
from services.scheduler.scripts import CLAIM_DELIVERIES
from services.scheduler.storage import ResultStores, StorageError

log = logging.getLogger(__name__)

MAX_BACKOFF_MS = 5 * 60 * 1000
_FIELDS = ("vendor", "result", "record", "create_ms", "update_ms")


def backoff_ms(tries: int, base_ms: int) -> int:
    """base, 2*base, 4*base, ... capped at five minutes."""
    return int(min(MAX_BACKOFF_MS, base_ms * 2 ** max(0, tries - 1)))


class Outbox:
    """The `deliveries` sorted set: job id -> when its delivery is next due."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, lease_ms: int = 60_000) -> None:
        self.redis = redis
        self.keys = keys
        self.lease_ms = lease_ms
        self._claim = redis.register_script(CLAIM_DELIVERIES)

    async def claim(self, limit: int) -> list[str]:
        got = await self._claim(args=[self.keys.prefix, limit, self.lease_ms])
        return [g.decode() for g in cast(list[bytes], got)]

    async def done(self, job_ids: list[str]) -> None:
        if job_ids:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(self.keys.deliveries, *job_ids)
                pipe.hdel(self.keys.delivery_tries, *job_ids)
                await pipe.execute()

    async def later(self, job_ids: list[str], base_ms: int) -> None:
        """Push each delivery back by its own backoff (two pipelined round trips in all)."""
        if not job_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hincrby(self.keys.delivery_tries, job_id, 1)
            tries = [int(t) for t in await pipe.execute()]
        now = int(time.time() * 1000)
        due = {j: now + backoff_ms(t, base_ms) for j, t in zip(job_ids, tries, strict=True)}
        await self.redis.zadd(self.keys.deliveries, due)


@dataclass
class _Due:
    job_id: str
    vendor: str
    result: jobs_pb2.Result
    record: jobs_pb2.RecordRef | None
    created_ms: int
    done_ms: int


class Deliverer:
    def __init__(
        self,
        outbox: Outbox,
        stores: ResultStores,
        writer: RecordWriter | None,
        retry_base_ms: int = 1000,
        batch: int = 500,
    ) -> None:
        self.outbox = outbox
        self.redis = outbox.redis
        self.keys = outbox.keys
        self.stores = stores
        self.writer = writer
        self.retry_base_ms = retry_base_ms
        self.batch = batch
        self.wake = asyncio.Event()

    async def run_forever(self, idle_s: float = 0.5) -> None:
        while True:
            try:
                if await self.deliver_once():
                    continue
            except aioredis.RedisError as exc:
                log.warning("delivery loop cannot reach redis", extra={"error": str(exc)})
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), idle_s)
            except TimeoutError:
                pass

    async def deliver_once(self) -> int:
        """Lease one group of due deliveries and make them; return how many were due."""
        ids = await self.outbox.claim(self.batch)
        if not ids:
            return 0
        due, gone = await self._load(ids)
        if gone:
            log.error("deliveries dropped: their jobs expired first", extra={"jobs": gone})
            await self.outbox.done(gone)
        uploaded, failed = await self._upload(due)
        delivered = await self._update_records(uploaded, failed)
        await self.outbox.done(delivered)
        if failed:
            await self.outbox.later(failed, self.retry_base_ms)
        return len(ids)

    async def _load(self, ids: list[str]) -> tuple[list[_Due], list[str]]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self.keys.job(job_id), *_FIELDS)
            rows = await pipe.execute()
        due: list[_Due] = []
        gone: list[str] = []
        for job_id, (vendor, result, record, created, updated) in zip(ids, rows, strict=True):
            if not vendor or not result:
                gone.append(job_id)
                continue
            ref = jobs_pb2.RecordRef.FromString(record) if record else None
            due.append(
                _Due(
                    job_id,
                    vendor.decode(),
                    jobs_pb2.Result.FromString(result),
                    ref,
                    int(created or 0),
                    int(updated or 0),
                )
            )
        return due, gone

    async def _upload(self, due: list[_Due]) -> tuple[list[_Due], list[str]]:
        """Move outputs still waiting locally to their vendor's remote store."""
        ok: list[_Due] = []
        failed: list[str] = []
        for item in due:
            remote = self.stores.remote_for(item.vendor)
            local_uri = item.result.uri
            if remote is None or not local_uri.startswith("local:"):
                ok.append(item)
                continue
            key = local_uri.removeprefix("local:")
            folder = item.record.project_id if item.record else ""
            try:
                data = b"".join([c async for c in self.stores.local.read(local_uri)])
                url = await remote.put(key, data, item.result.content_type, folder=folder)
            except (StorageError, OSError) as exc:
                metrics.STORAGE_ERRORS.labels(self.stores.backend_of(item.vendor), "put").inc()
                log.warning(
                    "upload still failing; will retry",
                    extra={"job_id": item.job_id, "vendor": item.vendor, "error": str(exc)},
                )
                failed.append(item.job_id)
                continue
            await self._switch_result(item, url)
            ok.append(item)
        return ok, failed

    async def _switch_result(self, item: _Due, url: str) -> None:
        """Point the job at its remote copy, then drop the local one."""
        old = item.result.uri
        item.result.uri = url
        deadline = await self.redis.zscore(self.keys.blobs, old)
        async with self.redis.pipeline(transaction=True) as pipe:
            if deadline is not None:
                pipe.zadd(self.keys.blobs, {url: deadline})
            pipe.hset(self.keys.job(item.job_id), "result", item.result.SerializeToString())
            await pipe.execute()
        await self.stores.local.delete(old)
        await self.redis.zrem(self.keys.blobs, old)
        log.info(
            "delayed upload done",
            extra={"job_id": item.job_id, "vendor": item.vendor, "uri": url},
        )

    async def _update_records(self, items: list[_Due], failed: list[str]) -> list[str]:
        """Write the records of items; return the ids fully delivered (failures join failed)."""
        updates = [
            RecordUpdate(
                vendor_id=i.vendor,
                project_id=i.record.project_id,
                record_id=i.record.record_id,
                photo_url=i.result.uri,
                job_id=i.job_id,
                job_created_ms=i.created_ms,
                processed_at=datetime.fromtimestamp(i.done_ms / 1000, UTC),
            )
            for i in items
            if i.record is not None
        ]
        if not updates:
            return [i.job_id for i in items]
        if self.writer is None:
            # The scheduler refuses records at submit when it has no database;
            # these were accepted by a replica configured with one. Keep them.
            log.error("record updates due but CUTOUT_MYSQL_URL is not set on this replica")
            failed.extend(i.job_id for i in items)
            return []
        try:
            await self.writer.apply(updates)
        except RecordsUnavailable as exc:
            metrics.RECORD_UPDATE_ERRORS.inc()
            log.warning(
                "record updates failed; will retry",
                extra={"jobs": len(updates), "error": str(exc)},
            )
            failed.extend(i.job_id for i in items if i.record is not None)
            return [i.job_id for i in items if i.record is None]
        metrics.RECORD_UPDATES.inc(len(updates))
        for update in updates:
            log.info(
                "record updated",
                extra={
                    "job_id": update.job_id,
                    "vendor": update.vendor_id,
                    "record": f"{update.project_id}/{update.record_id}",
                },
            )
        return [i.job_id for i in items]
