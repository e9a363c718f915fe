"""Moves queued jobs onto nodes: the claim loop of each lane and the map of running attempts.

One loop per lane claims jobs (fairly, through the job store's Lua script)
whenever a node has room; each claim becomes an `Attempt` (services/scheduler/
attempt.py), which runs the job on the node's Work stream and records what
happens. The attempts running here are held in one map, by job id; the loops
that keep their leases, reap other schedulers' expired ones and abandon those of
silent nodes are in services/scheduler/upkeep.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio as aioredis

from services.common.operations import Lane
from services.scheduler.attempt import Attempt, AttemptContext, DispatchPolicy
from services.scheduler.group_commit import GroupCommit
from services.scheduler.nodes import Node, NodePool
from services.scheduler.storage import ResultStores
from services.scheduler.store import Charge, Claim, Store
from services.scheduler.upkeep import Upkeep

log = logging.getLogger(__name__)
# The most jobs one claim takes for one node (one Redis round trip, one stream write).
CLAIM_BATCH = 16


class Dispatcher:
    def __init__(
        self,
        store: Store,
        pool: NodePool,
        results: ResultStores,
        policy: DispatchPolicy,
        on_delivery: Callable[[], None] = lambda: None,
        on_finished: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.pool = pool
        self.policy = policy
        self.ctx = AttemptContext(
            store=store,
            pool=pool,
            results=results,
            policy=policy,
            completions=GroupCommit(store.attempts.complete_many),
            on_delivery=on_delivery,  # wakes the delivery loop
            on_finished=on_finished,  # wakes the webhook sender
        )
        self._kicks = {lane: asyncio.Event() for lane in Lane}
        pool.on_change = self._kick  # a node's room changed: both lanes look again
        self.running: dict[str, Attempt] = {}  # job id -> its attempt running here
        self._requeues: set[asyncio.Task[None]] = set()  # jobs of attempts never sent
        self.upkeep = Upkeep(store, pool, results, policy, self.running, self._kick)

    async def run(self) -> None:
        """Claim and start attempts of both lanes, and watch their nodes, until stopped."""
        loops = [
            asyncio.create_task(self._listen()),
            asyncio.create_task(self._claim_loop(Lane.LIGHT)),
            asyncio.create_task(self.upkeep.watch_nodes_forever()),
        ]
        try:
            await self._claim_loop(Lane.HEAVY)
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    async def _claim_loop(self, lane: Lane) -> None:
        """One lane: inference work to the least-loaded node, light jobs to any with room.

        A node with several free slots gets up to CLAIM_BATCH jobs from one claim
        (one Redis round trip, fair as if claimed one by one), which then reach
        its Work stream in one write.
        """
        light = lane.light
        kick = self._kicks[lane]
        while not self.ctx.stopping:
            kick.clear()  # a kick from here on wakes the next wait: none is lost
            node = self.pool.pick(light)
            if node is None:
                await self._wait(kick, self.pool.poll_interval_s)
                continue
            room = node.room(light)
            try:
                claims = await self.store.claims.claim_many(
                    node.address, self.policy.lease_ms, lane, max(1, min(room, CLAIM_BATCH))
                )
            except aioredis.RedisError as exc:
                # Redis restarting or unreachable: jobs are safe in it; retry.
                log.warning("cannot claim: redis unavailable", extra={"error": str(exc)})
                await asyncio.sleep(1.0)
                continue
            if not claims:
                await self._wait(kick, 1.0)
                continue
            for claim in claims:
                self.start(claim, node, light)

    def start(self, claim: Claim, node: Node, light: bool) -> Attempt:
        """Run a claim made for `node` as an attempt held in the map until it ends."""
        attempt = Attempt.claimed(self.ctx, claim, node, light)
        self.running[claim.job_id] = attempt
        attempt.start(self._ended)
        return attempt

    def _ended(self, attempt: Attempt) -> None:
        job_id = attempt.claim.job_id
        if self.running.get(job_id) is attempt:  # not a newer attempt of the job
            del self.running[job_id]
        if attempt.requeue is not None:
            self._requeues.add(attempt.requeue)
            attempt.requeue.add_done_callback(self._requeues.discard)
        self._kicks[Lane.LIGHT if attempt.light else Lane.HEAVY].set()

    async def drain(self, grace_s: float) -> None:
        """Stop claiming; give running attempts grace_s to finish, then cancel them.

        A cancelled attempt goes back to its queue free of charge (or, if Redis
        cannot be reached, keeps its lease until it expires and the reaper of
        another scheduler puts it back): nothing is lost.
        """
        self.ctx.stopping = True
        self._kick()
        pending = {a.task for a in self.running.values() if a.task is not None}
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace_s)
            for attempt in list(self.running.values()):
                if attempt.task in still:
                    # Not the job's fault: back to its queue without using up a retry.
                    attempt.abandon("the scheduler running it stopped", Charge.FREE)
            await asyncio.gather(*still, return_exceptions=True)
        # Attempts cancelled before they ran put their jobs back in tasks of their own.
        await asyncio.gather(*list(self._requeues), return_exceptions=True)

    def _kick(self) -> None:
        for event in self._kicks.values():
            event.set()

    @staticmethod
    async def _wait(kick: asyncio.Event, timeout: float) -> None:
        """Until the lane is kicked (new work, a node's room changed) or timeout.

        No task per wait: a node's every returned credit wakes the claim loop, and
        two tasks each time were a visible part of the scheduler's CPU per job.
        """
        try:
            async with asyncio.timeout(timeout):
                await kick.wait()
        except TimeoutError:
            pass

    async def _listen(self) -> None:
        """Wake on new work; cancel attempts whose job a vendor cancelled.

        Resubscribes after Redis restarts; meanwhile the claim loop still polls.
        """
        while True:
            try:
                async for signal in self.store.signals.listen():
                    if not signal.cancelled:
                        self._kick()
                    elif (attempt := self.running.get(signal.cancelled)) is not None:
                        attempt.cancel()
            except aioredis.RedisError as exc:
                log.warning("lost redis pub/sub; resubscribing", extra={"error": str(exc)})
                await asyncio.sleep(1.0)
