"""One attempt of one job on one node, from send to its recorded outcome.

An `Attempt` owns everything about its run: the claim it runs, the node and
lane, the Work stream credit reserved for it (`ticket`), its task, whether it
was sent (used the credit) and took its first step, and why it was abandoned
if it was. Starting it takes a slot on the node; however its task ends, the
slot comes back and, if it was never sent, so does the credit.

Whose fault a lost attempt was decides whether it uses up one of the job's
retries (store.Charge): the node's (an error, a crash, the deadline, a node
gone silent) counts; the cluster's own (this scheduler stopping, Redis
restarting under it) does not. A short Redis outage does not end an attempt
at all: progress writes are retried, and the completion waits for Redis for
up to STORE_PATIENCE_S.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import redis.asyncio as aioredis

from cutout.names import job_name
from cutout.v1 import jobs_pb2
from services.common.errors import received, status_from_code, store_unavailable
from services.internal.v1 import inference_service_pb2 as inference_pb2
from services.scheduler import metrics
from services.scheduler.group_commit import GroupCommit
from services.scheduler.nodes import Node, NodePool
from services.scheduler.outputs import ProtocolError, store_output
from services.scheduler.progress import ProgressThrottle
from services.scheduler.storage import ResultStores
from services.scheduler.store import Charge, Claim, Completion, Retried, Store
from services.scheduler.work_link import LinkAttempt, NodeError

log = logging.getLogger(__name__)
T = TypeVar("T")
# How long an attempt whose node has answered waits for Redis to come back to record
# the outcome; past it the lease runs out and the reaper retries the job, free.
STORE_PATIENCE_S = 30.0


@dataclass(frozen=True)
class DispatchPolicy:
    """How attempts are leased, timed and watched (defaults: the scheduler's settings).

    Attributes:
        lease_ms: a running job's lease; renewed every third of it while the attempt runs.
        attempt_timeout_s: the ceiling of an attempt's deadline.
        attempt_timeout_floor_s: the least deadline an attempt gets.
        attempt_timeout_factor: the deadline is this many times the lane's average run time.
        node_silent_s: an attempt whose node has not answered a poll for this long is
            abandoned and retried elsewhere.
        reap_interval_s: how often expired leases are looked for.
        progress_interval_s: the least time between two progress writes of one attempt.
    """

    lease_ms: int
    attempt_timeout_s: float
    attempt_timeout_floor_s: float
    attempt_timeout_factor: float
    node_silent_s: float
    reap_interval_s: float
    progress_interval_s: float

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


@dataclass
class AttemptContext:
    """What every attempt of one scheduler shares."""

    store: Store
    pool: NodePool
    results: ResultStores
    policy: DispatchPolicy
    completions: GroupCommit[Completion, bool]  # successes that end together: one round trip
    on_delivery: Callable[[], None]  # a result or record is left to deliver
    on_finished: Callable[[], None]  # a job ended here: webhooks to send
    stopping: bool = False  # the scheduler is draining: no waiting out a Redis outage


class Attempt:
    """One attempt: `start` it; it ends by itself, or by `abandon` or `cancel`."""

    def __init__(
        self, ctx: AttemptContext, claim: Claim, node: Node, light: bool, ticket: int | None
    ) -> None:
        self.ctx = ctx
        self.claim = claim
        self.node = node
        self.light = light
        self.ticket = ticket  # the Work stream credit reserved for it (None: none left)
        self.sent = False  # reached the node's stream: its credit is spent
        self.ran = False  # its task took its first step
        self.abandoned: tuple[str, Charge] | None = None  # cancelled on purpose: why, charge
        self.task: asyncio.Task[None] | None = None
        self.requeue: asyncio.Task[None] | None = None  # puts back a job never sent
        self.log_extra = {
            "job_id": claim.job_id,
            "vendor": claim.vendor,
            "node": node.address,
            "attempt": claim.attempt,
        }

    @classmethod
    def claimed(cls, ctx: AttemptContext, claim: Claim, node: Node, light: bool) -> Attempt:
        """The attempt of a claim made for `node`, holding its slot and stream credit.

        The credit is taken as the job is claimed, not as the task starts: the
        claim loop may claim again before that, and must see both gone."""
        node.started(light)
        ticket = node.work.reserve(light) if node.work is not None else None
        return cls(ctx, claim, node, light, ticket)

    def start(self, on_end: Callable[[Attempt], None]) -> None:
        self.task = asyncio.create_task(self._run())
        self.task.add_done_callback(lambda _: self._ended(on_end))

    def abandon(self, why: str, charge: Charge) -> None:
        """End it on purpose; the job is retried elsewhere, charged as told."""
        if self.task is not None and not self.task.done() and self.abandoned is None:
            self.abandoned = (why, charge)
            self.task.cancel()

    def cancel(self) -> None:
        """End it without a retry: its job was cancelled or has moved on (fenced off)."""
        if self.task is not None:
            self.task.cancel()

    def _ended(self, on_end: Callable[[Attempt], None]) -> None:
        """However the task ended (even cancelled before its first step): slot, credit,
        and a job that never reached the node back to its queue at once, uncounted."""
        self.node.finished(self.light)
        if not self.sent and self.node.work is not None:
            self.node.work.unreserve(self.light, self.ticket)
        if self.abandoned is not None and not self.ran:
            why, _ = self.abandoned
            self.requeue = asyncio.create_task(
                self._retry(
                    grpc.StatusCode.UNAVAILABLE, why, Charge.REFUNDED, not self.ctx.stopping
                )
            )
        on_end(self)

    async def _run(self) -> None:
        self.ran = True
        claim = self.claim
        log.info("attempt started", extra=self.log_extra)
        metrics.ATTEMPTS.inc()
        if claim.attempt == 1 and claim.created_ms:
            metrics.QUEUE_WAIT.observe(max(0.0, time.time() - claim.created_ms / 1000))
        started = time.perf_counter()
        try:
            await self._on_node()
        except asyncio.CancelledError:
            if self.abandoned is None:
                log.info("attempt cancelled", extra=self.log_extra)  # by its vendor, or fenced
            else:
                why, charge = self.abandoned
                log.warning("attempt abandoned", extra={**self.log_extra, "reason": why})
                # A stopping scheduler must not wait out a Redis outage: the reaper
                # of another one will retry the job when its lease runs out.
                patient = not self.ctx.stopping
                await self._retry(grpc.StatusCode.UNAVAILABLE, why, charge, patient)
        except NodeError as exc:
            await self._on_node_error(exc.code, exc.details)
        except (ProtocolError, aioredis.RedisError, OSError) as exc:
            log.exception("attempt failed", extra=self.log_extra)
            # Redis or the result store failing under us is the cluster's fault, not the job's.
            free = isinstance(exc, OSError) or store_unavailable(exc)
            await self._retry(
                grpc.StatusCode.INTERNAL,
                f"attempt {claim.attempt} failed: {exc}",
                Charge.FREE if free else Charge.COUNTED,
            )
        finally:
            metrics.RUN.observe(time.perf_counter() - started)

    def _send(self) -> LinkAttempt | None:
        """Send the attempt on the node's Work stream, on its reserved credit. None: there is
        nothing to send (the job was cancelled as it was claimed)."""
        claim = self.claim
        if claim.image is None:
            return None
        if self.node.work is None:
            raise NodeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "no work stream to the node")
        request = inference_pb2.WorkJob(
            name=job_name(claim.job_id),
            attempt=claim.attempt,
            operation=jobs_pb2.Operation.FromString(claim.operation),
            image=claim.image,
            vendor_id=claim.vendor,
        )
        timeout_s = self.ctx.policy.deadline_s(claim.lane_run_ms)
        call = self.node.work.start_attempt(request, self.ticket, timeout_s)
        self.sent = True
        return call

    async def _on_node(self) -> None:
        call = self._send()
        if call is None:
            return  # no input: cancelled as it was claimed
        ctx, claim = self.ctx, self.claim
        output: inference_pb2.WorkOutput | None = None
        chunks: list[bytes] = []

        async def write(updates: list[tuple[int, int]]) -> bool:
            try:
                return await ctx.store.attempts.progress(claim, updates, ctx.policy.lease_ms)
            except aioredis.RedisError as exc:
                if not store_unavailable(exc):
                    raise
                # Redis restarting: the node keeps working; these reports go out with
                # the next write or the completion.
                progress.restore(updates)
                return True

        progress = ProgressThrottle(write, ctx.policy.progress_interval_s)
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
            completion = await store_output(ctx, claim, output, data, progress)
            done = await self._patiently("complete", lambda: ctx.completions.commit(completion))
            self._succeeded(done, completion.deliver, len(data))
        finally:
            call.cancel()
            await progress.close()

    def _succeeded(self, done: bool, deliver: bool, size: int) -> None:
        claim = self.claim
        if not done:
            log.info("attempt finished after its job moved on", extra=self.log_extra)
            return
        metrics.JOBS_FINISHED.labels("succeeded").inc()
        self.ctx.on_finished()
        if claim.created_ms:
            metrics.END_TO_END.observe(max(0.0, time.time() - claim.created_ms / 1000))
        if deliver:
            self.ctx.on_delivery()
        log.info("job succeeded", extra={**self.log_extra, "bytes": size, "deliver": deliver})

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

    async def _on_node_error(self, code: grpc.StatusCode, details: str) -> None:
        claim, node = self.claim, self.node
        log.warning(
            "node answered with an error",
            extra={**self.log_extra, "code": code.name, "details": details},
        )
        err = received(code, details)  # its kind says: retry or not, counted or not
        if not err.retryable:  # about the job itself (its input, its operation)
            error = status_from_code(code, details)
            if await self._patiently("fail", lambda: self.ctx.store.attempts.fail(claim, error)):
                metrics.JOBS_FINISHED.labels("failed").inc()
                self.ctx.on_finished()
            return
        if not err.started:
            # Full or draining: it refused before starting. Our view of its load
            # was stale (another scheduler's jobs, or a restart's orphans), so
            # treat it as full until the next poll and requeue without counting.
            node.refused(self.light)
            await self._retry(code, details, Charge.of(err))
            return
        if code == grpc.StatusCode.UNAVAILABLE:
            self.ctx.pool.mark_failed(node)  # the node crashed or went away: the job's retry
        await self._retry(
            code, f"attempt {claim.attempt} on {node.address}: {details}", Charge.of(err)
        )

    async def _retry(
        self,
        code: grpc.StatusCode,
        message: str,
        charge: Charge = Charge.COUNTED,
        patient: bool = True,
    ) -> None:
        claim, store = self.claim, self.ctx.store
        error = status_from_code(code, message)
        try:
            if patient:
                outcome = await self._patiently(
                    "retry", lambda: store.attempts.retry(claim, error, charge)
                )
            else:
                outcome = await store.attempts.retry(claim, error, charge)
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
            self.ctx.on_finished()
            log.warning(
                "job dead-lettered after its last retry",
                extra={"job_id": claim.job_id, "vendor": claim.vendor, "error": message},
            )
