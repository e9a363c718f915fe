"""The scheduler's background loops beside claiming: leases kept and reaped, silent nodes'
attempts abandoned, expired outputs swept.

Each takes the dispatcher's map of running attempts (job id -> Attempt) where it
needs one; none of them starts or ends an attempt itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import redis.asyncio as aioredis

from services.scheduler import metrics
from services.scheduler.attempt import Attempt, DispatchPolicy
from services.scheduler.nodes import NodePool
from services.scheduler.storage import ResultStores, StorageError
from services.scheduler.store import Charge, Store

log = logging.getLogger(__name__)


class Upkeep:
    def __init__(
        self,
        store: Store,
        pool: NodePool,
        results: ResultStores,
        policy: DispatchPolicy,
        running: Mapping[str, Attempt],
        on_promoted: Callable[[], None],
    ) -> None:
        self.store = store
        self.pool = pool
        self.results = results
        self.policy = policy
        self.running = running  # the dispatcher's, live
        self.on_promoted = on_promoted  # jobs whose backoff ended are claimable

    async def keep_leases_forever(self) -> None:
        """Keep the leases of every attempt running here, in one round trip per period.

        The node may work silently for long (the model runs for seconds). Every
        lease_ms / 3 all of them are renewed together (one task and one script
        call per scheduler, not per attempt); an attempt that lost its job
        (cancelled, or re-leased elsewhere) is stopped. A renewal that cannot
        reach Redis is tried again sooner: a restart must not cost the attempts
        their leases (a lease is 3 periods long). Runs until cancelled, through
        a drain: the attempts still finishing keep their leases.
        """
        period = self.policy.lease_ms / 3000
        wait = period
        while True:
            await asyncio.sleep(wait)
            held = dict(self.running)
            if not held:
                wait = period
                continue
            try:
                lost = await self.store.attempts.renew_many(
                    [a.claim for a in held.values()], self.policy.lease_ms
                )
            except aioredis.RedisError as exc:
                log.warning(
                    "cannot renew leases: redis unavailable",
                    extra={"attempts": len(held), "error": str(exc)},
                )
                wait = min(period, 0.5)
                continue
            wait = period
            for job_id in lost:
                # Only the attempt that was renewed: a newer one of the job may run here now.
                if (attempt := self.running.get(job_id)) is held[job_id]:
                    attempt.cancel()

    async def watch_nodes_forever(self) -> None:
        """Abandon the attempts of nodes that stopped answering polls.

        A SIGSTOPped node was marked unhealthy within 3 s, but its jobs waited
        for their 60 s deadline: the scheduler kept their leases alive. A node
        that answers (even NOT_SERVING while draining) keeps its attempts.
        """
        period = max(0.05, min(1.0, self.policy.node_silent_s / 4))
        while True:
            await asyncio.sleep(period)
            for attempt in list(self.running.values()):
                node = attempt.node
                silent = node.silent_s
                if silent > self.policy.node_silent_s and attempt.abandoned is None:
                    self.pool.mark_failed(node)
                    attempt.abandon(
                        f"node {node.address} stopped answering health checks "
                        f"(none answered for {silent:.1f} s)",
                        Charge.COUNTED,
                    )

    async def reap_forever(self) -> None:
        """Put back the jobs whose lease ran out (their scheduler died), and make the jobs
        whose retry backoff is over claimable."""
        while True:
            try:
                gone = await self.store.attempts.reap()
                metrics.LEASE_LOSSES.inc(len(gone))
                if gone:
                    log.warning("leases expired; jobs will be retried", extra={"jobs": gone})
                if await self.store.attempts.promote():
                    self.on_promoted()
            except aioredis.RedisError as exc:
                log.warning("reaper could not reach redis", extra={"error": str(exc)})
            await asyncio.sleep(self.policy.reap_interval_s)

    async def sweep_forever(self, interval_s: float) -> None:
        """Delete stored outputs whose jobs have expired (retention), in small batches.

        Each URI is forgotten only after its blob is gone, so a crash in
        between repeats a delete instead of leaking a file; several
        schedulers sweeping at once only repeat deletes.
        """
        while True:
            try:
                while due := await self.store.blobs.expired():
                    for uri in due:
                        await self.results.delete(uri)
                    await self.store.blobs.forget(due)
            except StorageError as exc:
                metrics.STORAGE_ERRORS.labels("cloudinary", "delete").inc()
                log.warning("retention sweep failed; will retry", extra={"error": str(exc)})
            except (aioredis.RedisError, OSError) as exc:
                log.warning("retention sweep failed; will retry", extra={"error": str(exc)})
            await asyncio.sleep(interval_s)
