"""The node's end of a Work stream: many attempts over one call, paced by credits.

A scheduler that opened one call per attempt spent most of its CPU
setting calls up (bench/scale.py: ~2 ms of scheduler CPU per 50 ms job).
Here one stream carries every attempt between a scheduler and a node. The
node grants credits (a slot each, per lane) when the stream opens and one
more as each job's work ends, so a scheduler never has more jobs here than
it was granted; a job sent without credit is refused (RESOURCE_EXHAUSTED)
and counted in `overdrawn`, which must stay 0.

When the stream ends (the scheduler stopped, died or lost the network),
every attempt it carried is stopped: the scheduler side retries them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import grpc
from google.rpc import status_pb2

from services.common.errors import CutoutError, ResourceExhausted
from services.common.operations import Lane
from services.common.work_batches import BATCHES_METADATA, take_ready
from services.internal.v1 import inference_service_pb2 as pb

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]
OK = status_pb2.Status(code=grpc.StatusCode.OK.value[0])


class Slot:
    """One credit held by one job; given back once, when the job's work is over.

    The work decides when (`hold` then the work's end releases it): a
    cancelled job whose thread still runs keeps its slot until the thread is
    free. A job refused before its work started gives it
    back as it ends.
    """

    def __init__(self, give_back: Callable[[], None]) -> None:
        self._give_back = give_back
        self.held_by_work = False
        self._released = False

    def hold(self) -> None:
        self.held_by_work = True

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._give_back()


# (job, slot) -> the attempt's messages (progress, output, chunks); raises CutoutError.
Run = Callable[[pb.WorkJob, Slot], AsyncIterator[pb.WorkUpdate]]


def response_bytes(message: pb.WorkResponse | None) -> int:
    if message is None:
        return 0
    return len(message.update.output.data) + len(message.update.chunk)


def merge_credits(messages: list[pb.WorkResponse]) -> list[pb.WorkResponse]:
    """The messages in order, their credits added up into one at the end."""
    kept = [m for m in messages if m.WhichOneof("payload") != "credit"]
    if len(kept) >= len(messages) - 1:
        return messages
    jobs = sum(m.credit.jobs for m in messages)
    light = sum(m.credit.light_jobs for m in messages)
    return [*kept, pb.WorkResponse(credit=pb.WorkCredit(jobs=jobs, light_jobs=light))]


class WorkSession:
    """One Work stream on the node side."""

    def __init__(self, run: Run, jobs: int, light_jobs: int) -> None:
        self._run = run
        self._initial = (jobs, light_jobs)
        self._out: asyncio.Queue[pb.WorkResponse | None] = asyncio.Queue()
        self._jobs: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.credit = {Lane.HEAVY: jobs, Lane.LIGHT: light_jobs}  # jobs it may still send
        self.overdrawn = 0  # jobs sent without credit: a scheduler bug if ever above 0
        self.most_outstanding = dict.fromkeys(Lane, 0)  # the most jobs at once, per lane
        self._outstanding = dict.fromkeys(Lane, 0)
        # Messages read and written (a batch is one), and what they carried.
        self.reads = self.jobs_read = self.writes = self.messages_written = 0

    async def serve(
        self, requests: AsyncIterator[pb.WorkRequest], context: Context
    ) -> AsyncIterator[pb.WorkResponse]:
        # The stream's end stops its jobs, whichever way it ends: a generator left
        # suspended at `yield` by a caller that hung up runs no `finally` until collected.
        # (grpc-stubs types the callback as a class of its own; any callable works.)
        cast("Any", context).add_done_callback(lambda _: self.stop())
        batches = BATCHES_METADATA in tuple(context.invocation_metadata() or ())
        reader = asyncio.create_task(self._read(requests))
        jobs, light_jobs = self._initial
        yield pb.WorkResponse(credit=pb.WorkCredit(jobs=jobs, light_jobs=light_jobs))
        left: list[pb.WorkResponse | None] = []  # taken, but past the last batch's size
        try:
            while True:
                message = left.pop() if left else await self._out.get()
                if message is None:
                    break
                self.writes += 1
                if not batches:
                    self.messages_written += 1
                    yield message
                    continue
                ready, left = take_ready(message, self._out, response_bytes)
                if None in ready:  # the stream's end: what came before it still goes
                    ready, left = ready[: ready.index(None)], [None]
                batch = merge_credits([m for m in ready if m is not None])
                self.messages_written += len(batch)
                yield batch[0] if len(batch) == 1 else pb.WorkResponse(more=batch)
        finally:
            reader.cancel()
            self.stop()

    def stop(self) -> None:
        for task in self._jobs.values():
            task.cancel()

    async def _read(self, requests: AsyncIterator[pb.WorkRequest]) -> None:
        try:
            async for batch in requests:
                self.reads += 1
                self._received(batch)
                for request in batch.more:
                    self._received(request)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            self._out.put_nowait(None)  # the scheduler closed its side: end the stream

    def _received(self, request: pb.WorkRequest) -> None:
        kind = request.WhichOneof("payload")
        if kind == "job":
            self.jobs_read += 1
            self._start(request.job)
        elif kind == "cancel":
            task = self._jobs.get((request.cancel.name, request.cancel.attempt))
            if task is not None:
                task.cancel()
        # else: the empty head of a batch

    def _start(self, job: pb.WorkJob) -> None:
        lane = Lane.of(job.operation)
        key = (job.name, job.attempt)
        if self.credit[lane] <= 0 or key in self._jobs:
            self.overdrawn += self.credit[lane] <= 0
            log.error("job sent without credit", extra={"job": job.name, "attempt": job.attempt})
            self._end(key, ResourceExhausted("no credit for this job"))
            return
        self.credit[lane] -= 1
        self._outstanding[lane] += 1
        self.most_outstanding[lane] = max(self.most_outstanding[lane], self._outstanding[lane])
        slot = Slot(lambda: self._give_back(lane))
        self._jobs[key] = asyncio.create_task(self._attempt(key, job, slot))

    def _give_back(self, lane: Lane) -> None:
        self.credit[lane] += 1
        self._outstanding[lane] -= 1
        grant = pb.WorkCredit(light_jobs=1) if lane is Lane.LIGHT else pb.WorkCredit(jobs=1)
        self._out.put_nowait(pb.WorkResponse(credit=grant))

    async def _attempt(self, key: tuple[str, int], job: pb.WorkJob, slot: Slot) -> None:
        name, attempt = key
        ended: CutoutError | None = None
        try:
            async for update in self._run(job, slot):
                self._out.put_nowait(pb.WorkResponse(name=name, attempt=attempt, update=update))
        except CutoutError as exc:
            ended = exc
        except asyncio.CancelledError:
            ended = CutoutError("attempt cancelled", grpc.StatusCode.CANCELLED)
        except Exception as exc:
            log.exception("attempt failed", extra={"job": name, "attempt": attempt})
            ended = CutoutError(f"{type(exc).__name__}: {exc}", grpc.StatusCode.UNKNOWN)
        finally:
            self._jobs.pop(key, None)
            if not slot.held_by_work:
                slot.release()
        self._end(key, ended)

    def _end(self, key: tuple[str, int], error: CutoutError | None) -> None:
        name, attempt = key
        status = OK if error is None else error.to_status()
        self._out.put_nowait(pb.WorkResponse(name=name, attempt=attempt, end=status))
