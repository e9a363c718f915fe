"""CutoutService: authenticate, validate, then hand over to the scheduler."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
import redis.asyncio as aioredis

from cutout.v1 import cutout_service_pb2 as pb
from cutout.v1 import cutout_service_pb2_grpc as pb_grpc
from cutout.v1 import jobs_pb2
from cutout.v1 import scheduler_service_pb2 as spb
from cutout.v1 import scheduler_service_pb2_grpc as spb_grpc
from services.common.errors import CutoutError, abort, abort_status, invalid_argument
from services.gateway import metrics
from services.gateway.auth import Authenticator
from services.gateway.enqueue_batcher import EnqueueBatcher, EnqueueRefused
from services.gateway.fetch import Fetcher
from services.gateway.intake import Limits, validate
from services.gateway.ratelimit import Decision, RateLimiter, refusal, trailers

log = logging.getLogger(__name__)
R = TypeVar("R")
Context = grpc.aio.ServicerContext[object, object]


async def _relay(context: Context, exc: grpc.aio.AioRpcError) -> None:
    """Pass a scheduler error on unchanged: code, message and rich details."""
    await context.abort(
        exc.code(), exc.details() or "", tuple(cast(Any, exc.trailing_metadata()) or ())
    )


def _limiter_down(exc: aioredis.RedisError) -> CutoutError:
    # Fail closed but retryable: without the limiter no quota can be kept.
    return CutoutError(
        f"rate limiter unavailable, retry shortly: {exc}", grpc.StatusCode.UNAVAILABLE
    )


def _operation(submission: jobs_pb2.JobSubmission) -> str:
    return str(submission.operation.WhichOneof("kind") or "remove_background")


class CutoutServicer(pb_grpc.CutoutServiceServicer):
    def __init__(
        self,
        keys: Authenticator,
        scheduler: spb_grpc.SchedulerServiceAsyncStub,
        limits: Limits,
        max_batch: int,
        timeout_s: float,
        limiter: RateLimiter,
        fetcher: Fetcher,
    ) -> None:
        self.limiter = limiter
        self.fetcher = fetcher
        self._fetching = asyncio.Semaphore(16)  # concurrent URL fetches per gateway
        self.keys = keys
        self.scheduler = scheduler
        self.limits = limits
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        # Concurrent submits (and a batch's items) reach the scheduler together.
        self.enqueuer = EnqueueBatcher(
            lambda request: scheduler.EnqueueJobs(request, timeout=timeout_s)
        )

    async def _unary(self, context: Context, rpc: Callable[..., Awaitable[R]], request: Any) -> R:
        """One scheduler call; its error goes back to the vendor unchanged."""
        try:
            return await rpc(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            await _relay(context, exc)
            raise  # not reached: abort raises

    async def _stream(
        self, context: Context, rpc: Callable[..., grpc.aio.UnaryStreamCall[Any, R]], request: Any
    ) -> AsyncIterator[R]:
        """A scheduler stream, relayed; cancelled when the vendor goes away."""
        call = rpc(request)
        try:
            async for reply in call:
                yield reply
        except grpc.aio.AioRpcError as exc:
            await _relay(context, exc)
        finally:
            call.cancel()

    async def _vendor(self, context: Context) -> str:
        try:
            return await self.keys.vendor_for(context.invocation_metadata() or ())
        except aioredis.RedisError as exc:
            await abort(
                context,
                CutoutError(
                    f"vendor registry unavailable, retry shortly: {exc}",
                    grpc.StatusCode.UNAVAILABLE,
                ),
            )
        except CutoutError as err:
            await abort(context, err)

    async def _fetched(self, sub: jobs_pb2.JobSubmission, prefix: str) -> jobs_pb2.JobSubmission:
        """The submission with a URL image replaced by the bytes fetched from it."""
        if sub.image.WhichOneof("source") != "uri":
            return sub
        async with self._fetching:
            data = await self.fetcher.fetch(sub.image.uri, f"{prefix}.image.uri")
        out = jobs_pb2.JobSubmission()
        out.CopyFrom(sub)
        out.image.content = data
        return out

    async def _take(self, vendor: str, quota: str, wanted: int) -> Decision | None:
        """Units of a quota; None when the quota is not limited (unknown name)."""
        if quota not in self.limiter.quotas or wanted == 0:
            return None
        try:
            own = self.keys.limits_of(vendor).get(quota)
            return await self.limiter.take(vendor, quota, wanted, own)
        except aioredis.RedisError as exc:
            raise _limiter_down(exc) from exc

    async def _admit_one(self, vendor: str, operation: str, context: Context) -> None:
        """One image: its operation quota and the request quota, all or nothing, one call."""
        own = self.keys.limits_of(vendor)
        wanted = [
            (name, own.get(name) or self.limiter.quotas[name])
            for name in (operation, "requests")
            if name in self.limiter.quotas
        ]
        if not wanted:
            return
        try:
            decisions = await self.limiter.take_all(vendor, wanted)
        except aioredis.RedisError as exc:
            raise _limiter_down(exc) from exc
        for decision in decisions:
            if not decision.allowed:
                raise refusal(decision, vendor)
        context.set_trailing_metadata(tuple(trailers(decisions[0])))

    async def SubmitJob(
        self, request: pb.SubmitJobRequest, context: Context
    ) -> pb.SubmitJobResponse:
        vendor = await self._vendor(context)
        try:
            await self._admit_one(vendor, _operation(request.submission), context)
            fetched = await self._fetched(request.submission, "submission")
            submission, pixels = validate(fetched, "submission", self.limits)
        except CutoutError as err:
            await abort(context, err)
        try:
            reply = await self.enqueuer.enqueue(
                spb.EnqueueJobRequest(vendor_id=vendor, submission=submission, input_pixels=pixels)
            )
        except EnqueueRefused as refused:
            await abort_status(context, refused.status)
        except grpc.aio.AioRpcError as exc:
            await _relay(context, exc)
        log.info(
            "job accepted", extra={"job_id": reply.job.name.removeprefix("jobs/"), "vendor": vendor}
        )
        return pb.SubmitJobResponse(job=reply.job, deduplicated=reply.deduplicated)

    async def SubmitBatch(
        self, request: pb.SubmitBatchRequest, context: Context
    ) -> pb.SubmitBatchResponse:
        vendor = await self._vendor(context)
        count = len(request.submissions)
        if not 1 <= count <= self.max_batch:
            await abort(
                context,
                invalid_argument("submissions", f"send 1-{self.max_batch} items, not {count}"),
            )
        batch = f"batches/{uuid.uuid4().hex}"
        try:
            whole = await self._take(vendor, "batches", 1)
            if whole is not None and not whole.allowed:
                raise refusal(whole, vendor)
            checked, refused = await self._admit_items(vendor, request)
        except CutoutError as err:
            await abort(context, err)

        outcomes = [pb.BatchItemOutcome(index=i) for i in range(count)]
        for index, why in refused.items():
            outcomes[index].error.CopyFrom(why.to_status())
        queued = sorted(checked)
        replies = await self.enqueuer.enqueue_all(
            [
                spb.EnqueueJobRequest(
                    vendor_id=vendor,
                    submission=checked[i][0],
                    input_pixels=checked[i][1],
                    batch=batch,
                )
                for i in queued
            ]
        )
        for index, reply in zip(queued, replies, strict=True):
            outcome = outcomes[index]
            if isinstance(reply, spb.EnqueueJobResponse):
                outcome.job.CopyFrom(reply.job)
            elif isinstance(reply, EnqueueRefused):
                outcome.error.CopyFrom(reply.status)
            elif isinstance(reply, grpc.aio.AioRpcError):
                outcome.error.code = reply.code().value[0]
                outcome.error.message = reply.details() or ""
            else:
                outcome.error.code = grpc.StatusCode.INTERNAL.value[0]
                outcome.error.message = f"could not queue this item: {reply}"
        accepted = sum(1 for o in outcomes if o.HasField("job"))
        metrics.BATCH_SIZE.observe(count)
        metrics.BATCH_ITEMS.labels("accepted").inc(accepted)
        metrics.BATCH_ITEMS.labels("rejected").inc(count - accepted)
        log.info(
            "batch accepted",
            extra={"vendor": vendor, "batch": batch, "accepted": accepted, "items": count},
        )
        return pb.SubmitBatchResponse(batch=batch, outcomes=outcomes)

    async def _admit_items(
        self, vendor: str, request: pb.SubmitBatchRequest
    ) -> tuple[dict[int, tuple[jobs_pb2.JobSubmission, int]], dict[int, CutoutError]]:
        """Validate every item, then count the valid ones against their quotas.

        Items are admitted in order while their operation's quota and the
        request quota last; the rest are refused one by one (with RetryInfo),
        never the whole batch.
        """
        checked: dict[int, tuple[jobs_pb2.JobSubmission, int]] = {}
        refused: dict[int, CutoutError] = {}
        by_operation: dict[str, list[int]] = {}

        async def fetch(index: int) -> jobs_pb2.JobSubmission | CutoutError:
            try:
                return await self._fetched(request.submissions[index], f"submissions[{index}]")
            except CutoutError as err:
                return err

        items = await asyncio.gather(*(fetch(i) for i in range(len(request.submissions))))
        for index, item in enumerate(items):
            try:
                if isinstance(item, CutoutError):
                    raise item
                checked[index] = validate(item, f"submissions[{index}]", self.limits)
            except CutoutError as err:
                refused[index] = err
                continue
            by_operation.setdefault(_operation(checked[index][0]), []).append(index)
        admitted: list[int] = []
        for operation, indices in by_operation.items():
            decision = await self._take(vendor, operation, len(indices))
            n = len(indices) if decision is None else decision.admitted
            admitted += indices[:n]
            for index in indices[n:]:
                assert decision is not None
                refused[index] = refusal(decision, vendor)
        admitted.sort()
        decision = await self._take(vendor, "requests", len(admitted))
        if decision is not None:
            for index in admitted[decision.admitted :]:
                refused[index] = refusal(decision, vendor)
        for index in refused:
            checked.pop(index, None)
        return checked, refused

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        vendor = await self._vendor(context)
        reply = await self._unary(
            context,
            self.scheduler.GetJob,
            spb.SchedulerServiceGetJobRequest(vendor_id=vendor, name=request.name),
        )
        return pb.GetJobResponse(job=reply.job)

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: Context
    ) -> AsyncIterator[pb.WatchJobResponse]:
        vendor = await self._vendor(context)
        async for reply in self._stream(
            context,
            self.scheduler.WatchJob,
            spb.SchedulerServiceWatchJobRequest(vendor_id=vendor, name=request.name),
        ):
            yield pb.WatchJobResponse(event=reply.event)

    async def WatchBatch(
        self, request: pb.WatchBatchRequest, context: Context
    ) -> AsyncIterator[pb.WatchBatchResponse]:
        vendor = await self._vendor(context)
        async for reply in self._stream(
            context,
            self.scheduler.WatchBatch,
            spb.SchedulerServiceWatchBatchRequest(vendor_id=vendor, name=request.name),
        ):
            yield pb.WatchBatchResponse(batch=reply.batch)

    async def CancelBatch(
        self, request: pb.CancelBatchRequest, context: Context
    ) -> pb.CancelBatchResponse:
        vendor = await self._vendor(context)
        reply = await self._unary(
            context,
            self.scheduler.CancelBatch,
            spb.SchedulerServiceCancelBatchRequest(vendor_id=vendor, name=request.name),
        )
        log.info(
            "batch cancelled",
            extra={"vendor": vendor, "batch": reply.batch.name, "cancelled": reply.cancelled},
        )
        return pb.CancelBatchResponse(cancelled=reply.cancelled, batch=reply.batch)

    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        vendor = await self._vendor(context)
        reply = await self._unary(
            context,
            self.scheduler.ListJobs,
            spb.SchedulerServiceListJobsRequest(
                vendor_id=vendor,
                state=request.state,
                page_size=request.page_size,
                page_token=request.page_token,
            ),
        )
        return pb.ListJobsResponse(jobs=reply.jobs, next_page_token=reply.next_page_token)

    async def CancelJob(
        self, request: pb.CancelJobRequest, context: Context
    ) -> pb.CancelJobResponse:
        vendor = await self._vendor(context)
        reply = await self._unary(
            context,
            self.scheduler.CancelJob,
            spb.SchedulerServiceCancelJobRequest(vendor_id=vendor, name=request.name),
        )
        log.info(
            "job cancelled",
            extra={"job_id": reply.job.name.removeprefix("jobs/"), "vendor": vendor},
        )
        return pb.CancelJobResponse(job=reply.job)

    async def GetResult(
        self, request: pb.GetResultRequest, context: Context
    ) -> AsyncIterator[pb.GetResultResponse]:
        vendor = await self._vendor(context)
        async for reply in self._stream(
            context,
            self.scheduler.ReadResult,
            spb.ReadResultRequest(vendor_id=vendor, name=request.name),
        ):
            response = pb.GetResultResponse(chunk=reply.chunk)
            if reply.HasField("result"):
                response.result.CopyFrom(reply.result)
            yield response

    async def GetQueueStats(
        self, request: pb.GetQueueStatsRequest, context: Context
    ) -> pb.GetQueueStatsResponse:
        vendor = await self._vendor(context)
        reply = await self._unary(
            context,
            self.scheduler.GetQueueStats,
            spb.SchedulerServiceGetQueueStatsRequest(vendor_id=vendor),
        )
        return pb.GetQueueStatsResponse(stats=reply.stats)

    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: Context
    ) -> pb.ListDeadLettersResponse:
        vendor = await self._vendor(context)
        reply = await self._unary(
            context,
            self.scheduler.ListDeadLetters,
            spb.SchedulerServiceListDeadLettersRequest(
                vendor_id=vendor, page_size=request.page_size, page_token=request.page_token
            ),
        )
        return pb.ListDeadLettersResponse(jobs=reply.jobs, next_page_token=reply.next_page_token)

    async def RequeueDeadLetter(
        self, request: pb.RequeueDeadLetterRequest, context: Context
    ) -> pb.RequeueDeadLetterResponse:
        vendor = await self._vendor(context)
        reply = await self._unary(
            context,
            self.scheduler.RequeueDeadLetter,
            spb.SchedulerServiceRequeueDeadLetterRequest(vendor_id=vendor, name=request.name),
        )
        log.info(
            "dead letter requeued",
            extra={"job_id": request.name.removeprefix("jobs/"), "vendor": vendor},
        )
        return pb.RequeueDeadLetterResponse(job=reply.job)

    async def PurgeDeadLetters(
        self, request: pb.PurgeDeadLettersRequest, context: Context
    ) -> pb.PurgeDeadLettersResponse:
        vendor = await self._vendor(context)
        reply = await self._unary(
            context,
            self.scheduler.PurgeDeadLetters,
            spb.SchedulerServicePurgeDeadLettersRequest(
                vendor_id=vendor, names=request.names, all=request.all
            ),
        )
        log.info("dead letters purged", extra={"vendor": vendor, "count": reply.purged_count})
        return pb.PurgeDeadLettersResponse(purged_count=reply.purged_count)
