"""Delivers succeeded jobs: the remote upload that failed inline, then the record update.

A job that succeeds with something still to deliver is queued in the
`deliveries` outbox by the same Lua script that marks it SUCCEEDED, so the
work is never lost between the two. Any scheduler replica leases due
deliveries in groups, uploads outputs still waiting in the local store to
the vendor's remote store (switching the job's result to the remote URL in
one compare-and-set script that also tells watchers), then writes the
group's record updates in as few statements as fit under the database's
packet limit. What fails is retried with backoff, forever, until the job's
retention ends: a storage or database outage delays a delivery, never drops
it, and never turns a job FAILED.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import redis.asyncio as aioredis

from services.scheduler import metrics
from services.scheduler.records import RecordsUnavailable, RecordUpdate, RecordWriter
from services.scheduler.storage import ResultStores, StorageError
from services.scheduler.store import BlobRetention, Delivery, Outbox, Switched

log = logging.getLogger(__name__)


class Deliverer:
    def __init__(
        self,
        outbox: Outbox,
        blobs: BlobRetention,
        stores: ResultStores,
        writer: RecordWriter | None,
        retry_base_ms: int = 1000,
        batch: int = 500,
    ) -> None:
        self.outbox = outbox
        self.blobs = blobs
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
        due, gone = await self.outbox.load(ids)
        uploaded, failed, expired = await self._upload(due)
        gone += expired
        if gone:
            log.error("deliveries dropped: their jobs expired first", extra={"jobs": gone})
            await self.outbox.done(gone)
        delivered = await self._update_records(uploaded, failed)
        await self.outbox.done(delivered)
        if failed:
            await self.outbox.later(failed, self.retry_base_ms)
        return len(ids)

    async def _upload(self, due: list[Delivery]) -> tuple[list[Delivery], list[str], list[str]]:
        """Move outputs still waiting locally to their vendor's remote store.

        Returns (to deliver on, failed, expired meanwhile).
        """
        ok: list[Delivery] = []
        failed: list[str] = []
        gone: list[str] = []
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
            if await self._switch_result(item, url):
                ok.append(item)
            else:
                gone.append(item.job_id)
        return ok, failed, gone

    async def _switch_result(self, item: Delivery, url: str) -> bool:
        """Point the job at its remote copy, then drop the local one.

        False: the job expired meanwhile; the sweeper deletes both copies.

        Two deliverers of one job (a lease that ran out mid-upload) both upload to
        the same key, which the store overwrites: one object. The switch is a
        compare-and-set, so exactly one of them points the job at it; the other
        adopts the job's result as it now is, deletes nothing (the object is the
        winner's too) and goes on to the record update, which is idempotent.
        """
        local_uri = item.result.uri
        outcome = await self.outbox.switch_result(item, url)
        extra = {"job_id": item.job_id, "vendor": item.vendor, "uri": item.result.uri}
        if outcome == Switched.GONE:
            return False
        if outcome == Switched.MOVED_ON:
            log.info("delayed upload already delivered by another deliverer", extra=extra)
            return True
        # The local copy is due for deletion from the switch on: delete it now
        # rather than at the next sweep, then forget it.
        await self.stores.local.delete(local_uri)
        await self.blobs.forget([local_uri])
        log.info("delayed upload done", extra=extra)
        return True

    async def _update_records(self, items: list[Delivery], failed: list[str]) -> list[str]:
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
