"""Moves queued jobs onto nodes and records what happens to them.

One loop claims jobs (fairly, through the job store's Lua script) whenever a
node has a free slot; each claimed attempt runs as its own task that streams
the node's progress into Redis, stores the output, and completes, retries or
fails the job. A reaper puts back jobs whose lease ran out because their
scheduler died; a watchdog abandons attempts whose node stopped answering
health polls (frozen, partitioned) so they run elsewhere at once instead of
at their deadline.

Whose fault a lost attempt was decides whether it uses up one of the job's
retries (store.Charge): the node's (an error, a crash, the deadline, a node
gone silent) counts; the cluster's own (this scheduler stopping, Redis
restarting under it) does not. A short Redis outage does not end an attempt
at all: lease renewals and progress writes are retried, and the completion
waits for Redis for up to STORE_PATIENCE_S.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import redis.asyncio as aioredis

from cutout.names import job_name
from cutout.v1 import jobs_pb2
from services.common.errors import NON_RETRYABLE, status_from_code, store_unavailable
from services.common.operations import HEAVY_LANE, LIGHT_LANE
from services.internal.v1 import inference_service_pb2 as inference_pb2
from services.scheduler import metrics
from services.scheduler.group_commit import GroupCommit
from services.scheduler.nodes import Node, NodePool
from services.scheduler.progress import ProgressThrottle
from services.scheduler.storage import ResultStores, StorageError
from services.scheduler.store import Charge, Claim, Completion, Retried, Store
from services.scheduler.work_link import LinkAttempt, NodeError

log = logging.getLogger(__name__)
T = TypeVar("T")
ProcessCall = grpc.aio.UnaryStreamCall[inference_pb2.ProcessRequest, inference_pb2.ProcessResponse]

EXTENSIONS = {"image/png": "png", "image/webp": "webp", "image/jpeg": "jpg"}
# How long an attempt whose node has answered waits for Redis to come back to record
# the outcome; past it the lease runs out and the reaper retries the job, free.
STORE_PATIENCE_S = 30.0
# The most jobs one claim takes for one node (one Redis round trip, one stream write).
CLAIM_BATCH = 16


@dataclass(frozen=True)
class DispatchPolicy:
    """
    Attributes:
        lease_ms: a running job's lease; renewed every third of it while the attempt runs.
        attempt_timeout_s: the ceiling of an attempt's deadline.
        attempt_timeout_floor_s: the least deadline an attempt gets.
        attempt_timeout_factor: the deadline is this many times the lane's average run time.
        node_silent_s: an attempt whose node has not answered a poll for this long is
            abandoned and retried elsewhere.
    """

    lease_ms: int = 15_000
    attempt_timeout_s: float = 60.0
    attempt_timeout_floor_s: float = 15.0
    attempt_timeout_factor: float = 5.0
    node_silent_s: float = 5.0
    reap_interval_s: float = 0.25
    progress_interval_s: float = 0.2

    def deadline_s(self, lane_run_ms: float | None) -> float:
        """An attempt's deadline: factor x its lane's moving average run time, at least the
        floor, at most the ceiling (the ceiling itself until an average exists).

        A fixed 60 s let a node that hung hold a 2-second job for a minute; scaled
        to what the lane really takes, a hung attempt is retried within seconds.
        """
        if lane_run_ms is None:
            return self.attempt_timeout_s
        scaled = self.attempt_timeout_factor * lane_run_ms / 1000
        return min(self.attempt_timeout_s, max(self.attempt_timeout_floor_s, scaled))


class ProtocolError(Exception):
    """The node's stream did not have the shape the API promises."""


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
        self.results = results
        self.policy = policy
        self.on_delivery = on_delivery  # wakes the delivery loop
        self.on_finished = on_finished  # a job ended here: wakes the webhook sender
        self._kicks = {HEAVY_LANE: asyncio.Event(), LIGHT_LANE: asyncio.Event()}
        pool.on_change = self._kick  # a node's room changed: both lanes look again
        self._attempts: dict[str, asyncio.Task[None]] = {}
        self._nodes: dict[str, Node] = {}  # job id -> the node its attempt runs on
        # job id -> why its attempt task was cancelled on purpose, and how to charge it
        self._abandoned: dict[str, tuple[str, Charge]] = {}
        self._claims: dict[str, Claim] = {}  # job id -> the claim its attempt runs
        # (job id, attempt) of attempts that were sent (used their credit), and of those
        # whose task took its first step.
        self._sent: set[tuple[str, int]] = set()
        self._ran: set[tuple[str, int]] = set()
        self._retries: set[asyncio.Task[None]] = set()  # retries of attempts that never ran
        self._stopping = False
        # Successes that come together go to Redis in one round trip.
        self._completions: GroupCommit[Completion, bool] = GroupCommit(store.attempts.complete_many)

    # --- loops ------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and start attempts of both lanes until stopped."""
        loops = [
            asyncio.create_task(self._listen()),
            asyncio.create_task(self._claim_loop(LIGHT_LANE)),
            asyncio.create_task(self._watch_nodes()),
        ]
        try:
            await self._claim_loop(HEAVY_LANE)
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)

    async def _claim_loop(self, lane: str) -> None:
        """One lane: inference work to the least-loaded node, light jobs to any with room.

        A node with several free slots gets up to CLAIM_BATCH jobs from one claim
        (one Redis round trip, fair as if claimed one by one), which then reach
        its Work stream in one write.
        """
        light = lane == LIGHT_LANE
        kick = self._kicks[lane]
        while not self._stopping:
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
                self._start(claim, node, light)

    def _start(self, claim: Claim, node: Node, light: bool) -> None:
        """Start the claimed attempt's task; its slot and credit come back when it ends
        (_ended), even if it is cancelled before it ever runs."""
        node.started(light)
        ticket = node.work.reserve(light) if node.work is not None and node.streams else None
        task = asyncio.create_task(self._attempt(claim, node, light, ticket))
        self._attempts[claim.job_id] = task
        self._nodes[claim.job_id] = node
        self._claims[claim.job_id] = claim
        task.add_done_callback(lambda t: self._ended(t, claim, node, light, ticket))

    def _ended(
        self,
        task: asyncio.Task[None],
        claim: Claim,
        node: Node,
        light: bool,
        ticket: int | None,
    ) -> None:
        """An attempt's task is over, however it ended: its slot, credit and records."""
        node.finished(light)
        job_id = claim.job_id
        if self._attempts.get(job_id) is task:
            del self._attempts[job_id]
            self._nodes.pop(job_id, None)
            self._claims.pop(job_id, None)
        key = (job_id, claim.attempt)
        if key not in self._sent and node.work is not None:
            node.work.unreserve(light, ticket)  # never sent: the credit is still ours
        self._sent.discard(key)
        abandoned = self._abandoned.pop(job_id, None)
        if abandoned is not None and key not in self._ran:
            # Cancelled before its first step (drain, a silent node): nothing reached
            # the node, so the attempt does not count; the job goes back now instead
            # of when its lease runs out.
            why, _ = abandoned
            retry = asyncio.create_task(
                self._retry(
                    claim, grpc.StatusCode.UNAVAILABLE, why, Charge.REFUNDED, not self._stopping
                )
            )
            self._retries.add(retry)
            retry.add_done_callback(self._retries.discard)
        self._ran.discard(key)
        self._kicks[LIGHT_LANE if light else HEAVY_LANE].set()

    async def _watch_nodes(self) -> None:
        """Abandon the attempts of nodes that stopped answering polls.

        A SIGSTOPped node was marked unhealthy within 3 s, but its jobs waited
        for their 60 s deadline: the scheduler kept their leases alive. A node
        that answers (even NOT_SERVING while draining) keeps its attempts.
        """
        period = max(0.05, min(1.0, self.policy.node_silent_s / 4))
        while True:
            await asyncio.sleep(period)
            for job_id, node in list(self._nodes.items()):
                silent = node.silent_s
                if silent > self.policy.node_silent_s and job_id not in self._abandoned:
                    self.pool.mark_failed(node)
                    self._abandon(
                        job_id,
                        f"node {node.address} stopped answering health checks "
                        f"(none answered for {silent:.1f} s)",
                        Charge.COUNTED,
                    )

    def _abandon(self, job_id: str, why: str, charge: Charge) -> None:
        """End the attempt's task on purpose; it retries the job, charged as told."""
        task = self._attempts.get(job_id)
        if task is not None and not task.done():
            self._abandoned[job_id] = (why, charge)
            task.cancel()

    async def reap_forever(self) -> None:
        while True:
            try:
                gone = await self.store.attempts.reap()
                metrics.LEASE_LOSSES.inc(len(gone))
                if gone:
                    log.warning("leases expired; jobs will be retried", extra={"jobs": gone})
                if await self.store.attempts.promote():
                    self._kick()
            except aioredis.RedisError as exc:
                log.warning("reaper could not reach redis", extra={"error": str(exc)})
            await asyncio.sleep(self.policy.reap_interval_s)

    async def sweep_forever(self, interval_s: float = 30.0) -> None:
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

    async def drain(self, grace_s: float) -> None:
        """Stop claiming; give running attempts grace_s to finish, then cancel them.

        A cancelled attempt goes back to its queue free of charge (or, if Redis
        cannot be reached, keeps its lease until it expires and the reaper of
        another scheduler puts it back): nothing is lost.
        """
        self._stopping = True
        self._kick()
        pending = list(self._attempts.values())
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace_s)
            for job_id, task in list(self._attempts.items()):
                if task in still:
                    # Not the job's fault: back to its queue without using up a retry.
                    self._abandon(job_id, "the scheduler running it stopped", Charge.FREE)
            await asyncio.gather(*still, return_exceptions=True)
        # Attempts cancelled before they ran put their jobs back in tasks of their own.
        await asyncio.gather(*list(self._retries), return_exceptions=True)

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
                    elif (task := self._attempts.get(signal.cancelled)) is not None:
                        task.cancel()
            except aioredis.RedisError as exc:
                log.warning("lost redis pub/sub; resubscribing", extra={"error": str(exc)})
                await asyncio.sleep(1.0)

    # --- one attempt -------------------------------------------------------------

    async def _attempt(
        self, claim: Claim, node: Node, light: bool = False, ticket: int | None = None
    ) -> None:
        """One attempt; ticket: the Work stream credit reserved for it (None: Process)."""
        self._ran.add((claim.job_id, claim.attempt))
        extra = {
            "job_id": claim.job_id,
            "vendor": claim.vendor,
            "node": node.address,
            "attempt": claim.attempt,
        }
        log.info("attempt started", extra=extra)
        metrics.ATTEMPTS.inc()
        if claim.attempt == 1 and claim.created_ms:
            metrics.QUEUE_WAIT.observe(max(0.0, time.time() - claim.created_ms / 1000))
        started = time.perf_counter()
        try:
            await self._run_on_node(claim, node, ticket)
        except asyncio.CancelledError:
            abandoned = self._abandoned.pop(claim.job_id, None)
            if abandoned is None:
                log.info("attempt cancelled", extra=extra)  # by its vendor, or fenced off
            else:
                why, charge = abandoned
                log.warning("attempt abandoned", extra={**extra, "reason": why})
                # A stopping scheduler must not wait out a Redis outage: the reaper
                # of another one will retry the job when its lease runs out.
                patient = not self._stopping
                await self._retry(claim, grpc.StatusCode.UNAVAILABLE, why, charge, patient)
        except grpc.aio.AioRpcError as exc:
            await self._on_node_error(claim, node, light, exc.code(), exc.details() or "", extra)
        except NodeError as exc:  # the same statuses, from an attempt on a Work stream
            await self._on_node_error(claim, node, light, exc.code, exc.details, extra)
        except (ProtocolError, aioredis.RedisError, OSError) as exc:
            log.exception("attempt failed", extra=extra)
            # Redis or the result store failing under us is the cluster's fault, not the job's.
            free = isinstance(exc, OSError) or store_unavailable(exc)
            await self._retry(
                claim,
                grpc.StatusCode.INTERNAL,
                f"attempt {claim.attempt} failed: {exc}",
                Charge.FREE if free else Charge.COUNTED,
            )
        finally:
            metrics.RUN.observe(time.perf_counter() - started)
            # Its slot, credit and records: in _ended, which runs however the task ended.

    async def _patiently(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """A store call retried while Redis is out of reach, for up to STORE_PATIENCE_S.

        The node's work is done (or its failure known); losing that to a Redis
        restart would run the job again and charge it a retry.
        """
        loop = asyncio.get_running_loop()
        give_up = loop.time() + STORE_PATIENCE_S
        pause = 0.1
        while True:
            try:
                return await call()
            except aioredis.RedisError as exc:
                if not store_unavailable(exc) or loop.time() + pause > give_up:
                    raise
                log.warning("redis unavailable; retrying", extra={"what": what, "error": str(exc)})
            await asyncio.sleep(pause)
            pause = min(1.0, pause * 2)

    def _send(
        self, claim: Claim, node: Node, ticket: int | None
    ) -> LinkAttempt | ProcessCall | None:
        """Send the attempt: on the node's Work stream with the credit `ticket` reserved,
        or as a Process call to a node without one. None: there is nothing to send
        (the job was cancelled as it was claimed). A credit not used goes back as the
        attempt ends (_ended)."""
        if claim.image is None:
            return None
        request = inference_pb2.ProcessRequest(
            name=job_name(claim.job_id),
            attempt=claim.attempt,
            operation=jobs_pb2.Operation.FromString(claim.operation),
            image=claim.image,
            vendor_id=claim.vendor,
        )
        timeout_s = self.policy.deadline_s(claim.lane_run_ms)
        if node.work is None or not node.streams:
            return node.stub.Process(request, timeout=timeout_s, metadata=self.pool.metadata)
        call = node.work.start_attempt(request, ticket, timeout_s)
        self._sent.add((claim.job_id, claim.attempt))
        return call

    async def _run_on_node(self, claim: Claim, node: Node, ticket: int | None) -> None:
        call = self._send(claim, node, ticket)
        if call is None:
            return  # no input: cancelled as it was claimed
        output: inference_pb2.ProcessOutput | None = None
        chunks: list[bytes] = []

        async def write(updates: list[tuple[int, int]]) -> bool:
            try:
                return await self.store.attempts.progress(claim, updates, self.policy.lease_ms)
            except aioredis.RedisError as exc:
                if not store_unavailable(exc):
                    raise
                # Redis restarting: the node keeps working; these reports go out with
                # the next write or the completion.
                progress.restore(updates)
                return True

        progress = ProgressThrottle(write, self.policy.progress_interval_s)
        try:
            async for response in call:
                kind = response.WhichOneof("payload")
                if kind == "progress":
                    p = response.progress
                    if not await progress.report(p.stage, p.progress_percent):
                        return  # fenced off: cancelled or re-leased elsewhere
                elif kind == "output":
                    output = response.output
                    for p in output.stages:  # written with the completion
                        progress.add(p.stage, p.progress_percent)
                elif kind == "chunk":
                    chunks.append(response.chunk)
            data = output.data if output is not None and output.data else b"".join(chunks)
            await self._store_result(claim, node, output, data, progress)
        finally:
            call.cancel()
            await progress.close()

    async def _store_result(
        self,
        claim: Claim,
        node: Node,
        output: inference_pb2.ProcessOutput | None,
        data: bytes,
        progress: ProgressThrottle,
    ) -> None:
        if output is None or output.content_type not in EXTENSIONS:
            raise ProtocolError("node ended the stream without a usable output header")
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != output.size_bytes or digest != output.sha256:
            raise ProtocolError(
                f"output arrived damaged: {len(data)} of {output.size_bytes} bytes, "
                f"sha256 {digest[:12]}"
            )
        if self.results.remote_for(claim.vendor) is None:
            progress.add(jobs_pb2.STAGE_STORING, 95)  # a local write: over at once
        else:
            await progress.report(jobs_pb2.STAGE_STORING, 95)  # an upload takes a while
        key = f"{claim.vendor}/{claim.job_id}.{EXTENSIONS[output.content_type]}"
        record = jobs_pb2.RecordRef.FromString(claim.record) if claim.record else None
        uri = await self._put(claim, key, data, output.content_type, record)
        # Still to do after SUCCEEDED: an upload that failed inline, a record update.
        pending_upload = self.results.remote_for(claim.vendor) is not None and uri.startswith(
            "local:"
        )
        deliver = pending_upload or record is not None
        result = jobs_pb2.Result(
            content_type=output.content_type,
            size_bytes=output.size_bytes,
            width_px=output.width_px,
            height_px=output.height_px,
            uri=uri,
            sha256=digest,
        )
        if output.HasField("subject_box"):
            result.subject_box.CopyFrom(output.subject_box)
        # Stages not written yet, the output's retention and SUCCEEDED: one round trip.
        updates = progress.take()
        completion = Completion(claim, result, deliver, updates, self.policy.lease_ms)
        done = await self._patiently("complete", lambda: self._completions.commit(completion))
        if done:
            metrics.JOBS_FINISHED.labels("succeeded").inc()
            self.on_finished()
            if claim.created_ms:
                metrics.END_TO_END.observe(max(0.0, time.time() - claim.created_ms / 1000))
            if deliver:
                self.on_delivery()
            log.info(
                "job succeeded",
                extra={
                    "job_id": claim.job_id,
                    "vendor": claim.vendor,
                    "node": node.address,
                    "bytes": len(data),
                    "pending_upload": pending_upload,
                },
            )
        else:
            log.info(
                "attempt finished after its job moved on",
                extra={"job_id": claim.job_id, "vendor": claim.vendor, "node": node.address},
            )

    async def _put(
        self,
        claim: Claim,
        key: str,
        data: bytes,
        content_type: str,
        record: jobs_pb2.RecordRef | None,
    ) -> str:
        """Store in the vendor's remote store; if that fails, keep it locally for later."""
        remote = self.results.remote_for(claim.vendor)
        if remote is not None:
            try:
                return await remote.put(
                    key, data, content_type, folder=record.project_id if record else ""
                )
            except StorageError as exc:
                metrics.STORAGE_ERRORS.labels(self.results.backend_of(claim.vendor), "put").inc()
                log.warning(
                    "upload failed; output kept locally and uploaded later",
                    extra={"job_id": claim.job_id, "vendor": claim.vendor, "error": str(exc)},
                )
        return await self.results.local.put(key, data, content_type)

    async def _on_node_error(
        self,
        claim: Claim,
        node: Node,
        light: bool,
        code: grpc.StatusCode,
        details: str,
        extra: dict[str, object],
    ) -> None:
        log.warning(
            "node answered with an error", extra={**extra, "code": code.name, "details": details}
        )
        if code.value[0] in NON_RETRYABLE:
            error = status_from_code(code, details)
            if await self._patiently("fail", lambda: self.store.attempts.fail(claim, error)):
                metrics.JOBS_FINISHED.labels("failed").inc()
                self.on_finished()
            return
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # Full or draining: it refused before starting. Our view of its load
            # was stale (another scheduler's jobs, or a restart's orphans), so
            # treat it as full until the next poll and requeue without counting.
            node.refused(light)
            await self._retry(claim, code, details, Charge.REFUNDED)
            return
        if code == grpc.StatusCode.UNAVAILABLE:
            self.pool.mark_failed(node)  # the node crashed or went away: the job's retry
        await self._retry(claim, code, f"attempt {claim.attempt} on {node.address}: {details}")

    async def _retry(
        self,
        claim: Claim,
        code: grpc.StatusCode,
        message: str,
        charge: Charge = Charge.COUNTED,
        patient: bool = True,
    ) -> None:
        error = status_from_code(code, message)
        try:
            if patient:
                outcome = await self._patiently(
                    "retry", lambda: self.store.attempts.retry(claim, error, charge)
                )
            else:
                outcome = await self.store.attempts.retry(claim, error, charge)
        except aioredis.RedisError as exc:
            # The lease runs out and the reaper retries the job (free of charge).
            log.error(
                "could not record a failed attempt; its lease will expire",
                extra={"job_id": claim.job_id, "error": str(exc)},
            )
            return
        if outcome == Retried.RETRYING:
            metrics.RETRIES.inc()
        if outcome == Retried.DEAD_LETTERED:
            metrics.DEAD_LETTERS.inc()
            metrics.JOBS_FINISHED.labels("failed").inc()
            self.on_finished()
            log.warning(
                "job dead-lettered after its last retry",
                extra={"job_id": claim.job_id, "vendor": claim.vendor, "error": message},
            )

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
            held = dict(self._claims)
            if not held:
                wait = period
                continue
            try:
                lost = await self.store.attempts.renew_many(
                    list(held.values()), self.policy.lease_ms
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
                task = self._attempts.get(job_id)
                # Only the attempt that was renewed: a newer one of the job may run here now.
                if task is not None and self._claims.get(job_id) is held[job_id]:
                    task.cancel()
