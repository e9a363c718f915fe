"""SubmitJob and SubmitBatch: the part of the public API only the gateway can serve.

A submit needs what the gateway holds: the vendor's quotas, the URL fetcher
and the image checks. Accepted jobs go to the scheduler's internal
EnqueueJobs in group commits (enqueue_batcher.py). Every other public method
is relayed to the scheduler unchanged (relay.py). The vendor comes from the
VendorAuth interceptor; CutoutErrors become statuses in ErrorMapping.

Billing: an image refused for bad input takes nothing from the vendor's
quotas (inline images are checked before the quota is taken). An image given
by URL takes its quota before the fetch, because the fetch is work done for
the vendor whatever the bytes turn out to be.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, cast

import grpc
import redis.asyncio as aioredis

from cutout.v1 import cutout_service_pb2 as pb
from cutout.v1 import jobs_pb2
from services.common.errors import CutoutError, abort_status, invalid_argument
from services.common.identity import current_vendor
from services.gateway import metrics
from services.gateway.auth import Authenticator
from services.gateway.enqueue_batcher import EnqueueBatcher, EnqueueRefused
from services.gateway.fetch import Fetcher
from services.gateway.intake import Limits, validate
from services.gateway.ratelimit import Decision, RateLimiter, refusal, trailers
from services.internal.v1 import scheduler_service_pb2 as spb

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[object, object]
# The methods served here; relay.py forwards the rest.
SERVED_HERE = ("SubmitJob", "SubmitBatch")
Checked = tuple[jobs_pb2.JobSubmission, int]  # the submission with inline bytes, its pixels


def _limiter_down(exc: aioredis.RedisError) -> CutoutError:
    # Fail closed but retryable: without the limiter no quota can be kept.
    return CutoutError(
        f"rate limiter unavailable, retry shortly: {exc}",
        grpc.StatusCode.UNAVAILABLE,
        retry_after_s=1.0,
    )


def _operation(submission: jobs_pb2.JobSubmission) -> str:
    return str(submission.operation.WhichOneof("kind") or "remove_background")


def _is_url(submission: jobs_pb2.JobSubmission) -> bool:
    return submission.image.WhichOneof("source") == "uri"


class SubmitServicer:
    def __init__(
        self,
        keys: Authenticator,
        enqueuer: EnqueueBatcher,
        limits: Limits,
        max_batch: int,
        limiter: RateLimiter,
        fetcher: Fetcher,
    ) -> None:
        self.keys = keys
        self.enqueuer = enqueuer
        self.limits = limits
        self.max_batch = max_batch
        self.limiter = limiter
        self.fetcher = fetcher
        self._fetching = asyncio.Semaphore(16)  # concurrent URL fetches per gateway

    async def _fetched(self, sub: jobs_pb2.JobSubmission, prefix: str) -> jobs_pb2.JobSubmission:
        """The submission with a URL image replaced by the bytes fetched from it."""
        if not _is_url(sub):
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
        vendor = current_vendor()
        sub = request.submission
        if _is_url(sub):
            await self._admit_one(vendor, _operation(sub), context)
            submission, pixels = validate(
                await self._fetched(sub, "submission"), "submission", self.limits
            )
        else:
            submission, pixels = validate(sub, "submission", self.limits)
            await self._admit_one(vendor, _operation(submission), context)
        try:
            reply = await self.enqueuer.enqueue(
                spb.JobToEnqueue(vendor_id=vendor, submission=submission, input_pixels=pixels)
            )
        except EnqueueRefused as refused:
            await abort_status(context, refused.status)
        except grpc.aio.AioRpcError as exc:
            await context.abort(
                exc.code(), exc.details() or "", cast(Any, exc.trailing_metadata()) or ()
            )
        log.info(
            "job accepted", extra={"job_id": reply.job.name.removeprefix("jobs/"), "vendor": vendor}
        )
        return pb.SubmitJobResponse(job=reply.job, deduplicated=reply.deduplicated)

    async def SubmitBatch(
        self, request: pb.SubmitBatchRequest, context: Context
    ) -> pb.SubmitBatchResponse:
        vendor = current_vendor()
        count = len(request.submissions)
        if not 1 <= count <= self.max_batch:
            raise invalid_argument("submissions", f"send 1-{self.max_batch} items, not {count}")
        batch = f"batches/{uuid.uuid4().hex}"
        whole = await self._take(vendor, "batches", 1)
        if whole is not None and not whole.allowed:
            raise refusal(whole, vendor)
        checked, refused = await self._admit_items(vendor, request)

        outcomes = [pb.BatchItemOutcome(index=i) for i in range(count)]
        for index, why in refused.items():
            outcomes[index].error.CopyFrom(why.to_status())
        queued = sorted(checked)
        replies = await self.enqueuer.enqueue_all(
            [
                spb.JobToEnqueue(
                    vendor_id=vendor,
                    submission=checked[i][0],
                    input_pixels=checked[i][1],
                    batch=batch,
                )
                for i in queued
            ]
        )
        for index, reply in zip(queued, replies, strict=True):
            _record(outcomes[index], reply)
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
    ) -> tuple[dict[int, Checked], dict[int, CutoutError]]:
        """Validate every item, then count the valid ones against their quotas.

        Items are admitted in order while their operation's quota and the
        request quota last; the rest are refused one by one (with RetryInfo),
        never the whole batch. Invalid items take no quota.
        """
        checked: dict[int, Checked] = {}
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


def _record(outcome: pb.BatchItemOutcome, reply: spb.EnqueuedJob | BaseException) -> None:
    """One batch item's enqueue outcome, as the vendor sees it."""
    if isinstance(reply, spb.EnqueuedJob):
        outcome.job.CopyFrom(reply.job)
    elif isinstance(reply, EnqueueRefused):
        outcome.error.CopyFrom(reply.status)
    elif isinstance(reply, grpc.aio.AioRpcError):
        outcome.error.code = reply.code().value[0]
        outcome.error.message = reply.details() or ""
    else:
        outcome.error.code = grpc.StatusCode.INTERNAL.value[0]
        outcome.error.message = f"could not queue this item: {reply}"
