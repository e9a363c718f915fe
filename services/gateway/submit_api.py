"""SubmitJob and SubmitBatch: the part of the public API only the gateway can serve.

A submit needs what the gateway holds: the vendor's quotas, the URL fetcher
and the image checks. Accepted jobs go to the scheduler's internal
EnqueueJobs in group commits (enqueue_batcher.py). Every other public method
is relayed to the scheduler unchanged (relay.py). The vendor comes from the
VendorAuth interceptor; CutoutErrors become statuses in ErrorMapping.

Billing: an image refused for bad input takes nothing from the vendor's
quotas (inline images are checked before the quota is taken). An image given
by URL takes its quota before the fetch, because the fetch is work done for
the vendor whatever the bytes turn out to be; but only once it holds a fetch
slot (fetch.py's FetchSlots), so a submit refused for want of one costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc
import redis.asyncio as aioredis

from cutout.v1 import cutout_service_pb2 as pb
from cutout.v1 import jobs_pb2
from services.common import webhook_registry
from services.common.errors import (
    CutoutError,
    FailedPrecondition,
    FieldViolation,
    invalid_argument,
    relayed_trailers,
    unavailable,
    unreachable,
)
from services.common.fetch import Fetcher
from services.common.identity import current_vendor
from services.common.webhook_policy import WebhookPolicy
from services.gateway import metrics
from services.gateway.auth import Authenticator
from services.gateway.enqueue_batcher import EnqueueBatcher
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
    return unavailable(f"rate limiter unavailable, retry shortly: {exc}")


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
        webhooks: WebhookPolicy | None = None,
    ) -> None:
        self.keys = keys
        self.enqueuer = enqueuer
        self.limits = limits
        self.max_batch = max_batch
        self.limiter = limiter
        self.fetcher = fetcher
        self.webhooks = webhooks or WebhookPolicy()

    async def _fetched(
        self, sub: jobs_pb2.JobSubmission, prefix: str, deadline: float
    ) -> jobs_pb2.JobSubmission:
        """The submission with its URL image replaced by the bytes fetched from it, by
        `deadline` (event loop time); the caller holds the vendor's and a gateway slot."""
        left = deadline - asyncio.get_running_loop().time()
        data = await self.fetcher.fetch(sub.image.uri, f"{prefix}.image.uri", left)
        out = jobs_pb2.JobSubmission()
        out.CopyFrom(sub)
        out.image.content = data
        return out

    def _deadline(self) -> float:
        """When a fetch starting now must be over, slot waits included."""
        return asyncio.get_running_loop().time() + self.fetcher.policy.timeout_s

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
        if sub.webhook_url:  # refused before it takes quota
            await self._require_webhook_secret(vendor)
            await self.webhooks.check(sub.webhook_url, "submission.webhook_url")
        if _is_url(sub):
            deadline = self._deadline()
            slots = self.fetcher.slots
            left = deadline - asyncio.get_running_loop().time()
            # Slots first, so a submit refused for want of one takes no quota.
            async with slots.vendor(vendor), slots.shared(left):
                await self._admit_one(vendor, _operation(sub), context)
                fetched = await self._fetched(sub, "submission", deadline)
            submission, pixels = validate(fetched, "submission", self.limits)
        else:
            submission, pixels = validate(sub, "submission", self.limits)
            await self._admit_one(vendor, _operation(submission), context)
        try:
            reply = await self.enqueuer.enqueue(
                spb.JobToEnqueue(vendor_id=vendor, submission=submission, input_pixels=pixels)
            )
        except grpc.aio.AioRpcError as exc:
            if (down := unreachable(exc, "scheduler")) is not None:
                raise down from None  # in our words: gRPC's names the scheduler's address
            # The scheduler's status as it is: UNAVAILABLE stays retryable, details kept.
            await context.abort(
                exc.code(), exc.details() or "", relayed_trailers(exc.trailing_metadata())
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
        if request.webhook_url or any(s.webhook_url for s in request.submissions):
            await self._require_webhook_secret(vendor)
        if request.webhook_url:
            await self.webhooks.check(request.webhook_url, "webhook_url")
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

    async def _require_webhook_secret(self, vendor: str) -> None:
        """A submit's own webhook URL is signed with the vendor's secret: refuse it while
        the vendor has none (it would be retried for a day, unsigned never)."""
        try:
            endpoint = await webhook_registry.read(self.limiter.redis, self.limiter.prefix, vendor)
        except aioredis.RedisError as exc:
            raise _limiter_down(exc) from exc
        if not endpoint.secrets:
            raise FailedPrecondition(
                f"vendor {vendor} has no webhook signing secret, so webhook_url cannot be "
                "signed: an operator creates one with `cutout-admin vendors set "
                f"{vendor} --webhook URL` (see docs/webhooks.md)"
            )

    async def _with_webhook(
        self,
        request: pb.SubmitBatchRequest,
        index: int,
        checked: dict[str, asyncio.Future[object]],
    ) -> jobs_pb2.JobSubmission | CutoutError:
        """Item index with its own webhook_url checked, or the batch's (checked already)
        given to it; one check (and DNS lookup) per distinct URL however many name it."""
        sub = request.submissions[index]
        if sub.webhook_url:
            field = f"submissions[{index}].webhook_url"
            if sub.webhook_url not in checked:
                checked[sub.webhook_url] = asyncio.ensure_future(
                    self.webhooks.check(sub.webhook_url, field)
                )
            try:
                await asyncio.shield(checked[sub.webhook_url])
            except CutoutError as err:
                return _for_field(err, field)
        elif request.webhook_url:
            own = jobs_pb2.JobSubmission()
            own.CopyFrom(sub)
            own.webhook_url = request.webhook_url
            return own
        return sub

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

        webhooks_checked: dict[str, asyncio.Future[object]] = {}

        async def fetch(index: int) -> jobs_pb2.JobSubmission | CutoutError:
            sub = await self._with_webhook(request, index, webhooks_checked)
            if isinstance(sub, CutoutError):
                return sub
            if not _is_url(sub):
                return sub
            slots = self.fetcher.slots
            try:
                # A batch's items wait for the vendor's own slots, a few at a time.
                async with slots.vendor(vendor, wait=True):
                    deadline = self._deadline()
                    async with slots.shared(deadline - asyncio.get_running_loop().time()):
                        return await self._fetched(sub, f"submissions[{index}]", deadline)
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


def _for_field(err: CutoutError, field: str) -> CutoutError:
    """A URL check's refusal, reported against this item's field (the first item to
    name a URL made the check)."""
    first = err.violations[0].field if err.violations else field
    if first == field:
        return err
    return CutoutError(
        err.message.replace(first, field, 1),
        err.code,
        [FieldViolation(field, v.description) for v in err.violations],
    )


def _record(outcome: pb.BatchItemOutcome, reply: spb.EnqueuedJob | BaseException) -> None:
    """One batch item's enqueue outcome, as the vendor sees it."""
    if isinstance(reply, spb.EnqueuedJob):
        outcome.job.CopyFrom(reply.job)
    elif isinstance(reply, CutoutError):  # the scheduler's refusal (details kept), or ours
        outcome.error.CopyFrom(reply.to_status())
    elif isinstance(reply, grpc.aio.AioRpcError):
        if (down := unreachable(reply, "scheduler")) is not None:
            outcome.error.CopyFrom(down.to_status())
        else:
            outcome.error.code = reply.code().value[0]
            outcome.error.message = reply.details() or ""
    else:
        outcome.error.code = grpc.StatusCode.INTERNAL.value[0]
        outcome.error.message = f"could not queue this item: {reply}"
