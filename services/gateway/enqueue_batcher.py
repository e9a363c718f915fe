"""Group commit for submits: concurrent enqueues travel to the scheduler together.

Each accepted submit needs one enqueue in the scheduler. Sent one call each,
the gRPC hop and the Redis round trip cost more than the work; sent together,
one EnqueueJobs call (one Redis pipeline) carries many. Batching is natural,
not timed: an enqueue goes out at once when fewer than `max_in_flight` calls
are under way, so a lone submit waits for nothing; under load, the submits
that arrive while the calls are busy leave together when one comes back.

Each item keeps its own outcome: one refused job (a vendor over its cap, a
duplicate) never affects the others in its call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from services.common.errors import from_status, unavailable
from services.internal.v1 import scheduler_service_pb2 as spb

Send = Callable[[spb.EnqueueJobsRequest], Awaitable[spb.EnqueueJobsResponse]]


@dataclass(frozen=True)
class BatchLimits:
    max_items: int = 64
    # Below the scheduler's gRPC message limit (CUTOUT_MAX_MESSAGE_BYTES, 32 MiB by default).
    max_bytes: int = 8 * 1024 * 1024
    max_in_flight: int = 4


Pending = tuple[spb.JobToEnqueue, int, "asyncio.Future[spb.EnqueuedJob]"]


class EnqueueBatcher:
    def __init__(self, send: Send, limits: BatchLimits | None = None) -> None:
        self._send = send
        self.limits = limits or BatchLimits()
        self._pending: list[Pending] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def enqueue(self, request: spb.JobToEnqueue) -> spb.EnqueuedJob:
        """Queue one job; raises the CutoutError the scheduler refused it with (its status
        and details kept, to pass on as they came), or the call's grpc.aio.AioRpcError."""
        (future,) = self._add([request])
        return await future

    async def enqueue_all(
        self, requests: list[spb.JobToEnqueue]
    ) -> list[spb.EnqueuedJob | BaseException]:
        """Queue many jobs (a batch's items) in as few calls as fit; one outcome each."""
        return await asyncio.gather(*self._add(requests), return_exceptions=True)

    def _add(self, requests: list[spb.JobToEnqueue]) -> list[asyncio.Future[spb.EnqueuedJob]]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[spb.EnqueuedJob]] = []
        for request in requests:
            futures.append(loop.create_future())
            self._pending.append((request, request.ByteSize(), futures[-1]))
        self._flush()
        return futures

    def _flush(self) -> None:
        while self._pending and self._in_flight < self.limits.max_in_flight:
            batch = self._take()
            self._in_flight += 1
            task = asyncio.create_task(self._call(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[Pending]:
        """The oldest pending items that fit one call (always at least one)."""
        size = 0
        count = 0
        for _, nbytes, _ in self._pending:
            if count and (count == self.limits.max_items or size + nbytes > self.limits.max_bytes):
                break
            size += nbytes
            count += 1
        batch, self._pending = self._pending[:count], self._pending[count:]
        return batch

    async def _call(self, batch: list[Pending]) -> None:
        try:
            reply = await self._send(spb.EnqueueJobsRequest(jobs=[r for r, _, _ in batch]))
            if len(reply.outcomes) != len(batch):
                raise RuntimeError(
                    f"scheduler answered {len(reply.outcomes)} outcomes for {len(batch)} jobs"
                )
            for (_, _, future), outcome in zip(batch, reply.outcomes, strict=True):
                if future.done():
                    continue
                if outcome.HasField("accepted"):
                    future.set_result(outcome.accepted)
                else:
                    future.set_exception(from_status(outcome.error))
        except Exception as exc:  # the call failed as a whole: every item hears why
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        finally:
            for _, _, future in batch:  # cancelled while in flight (shutdown)
                if not future.done():
                    future.set_exception(unavailable("enqueue interrupted; retry"))
            self._in_flight -= 1
            self._flush()
