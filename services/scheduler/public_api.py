"""The public `cutout.v1.CutoutService`, as far as the scheduler serves it.

Everything a vendor does to jobs that exist lives here: read, watch, list,
cancel, results, stats, batches and dead letters. The gateway relays these
calls unchanged after authenticating the vendor (services/gateway/relay.py);
who is calling comes from the internal-auth interceptor
(services/common/internal_auth.py), and errors become statuses in the
ErrorMapping interceptor, so each method holds only its own logic.

SubmitJob and SubmitBatch are the gateway's alone: it takes quotas, fetches
URLs and validates images before anything reaches Redis.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from cutout.names import BATCH_PREFIX, batch_id_from_name, job_id_from_name
from cutout.v1 import cutout_service_pb2 as pb
from cutout.v1 import cutout_service_pb2_grpc as pb_grpc
from services.common.errors import CutoutError, DataLoss, invalid_argument, not_found
from services.common.identity import current_vendor
from services.scheduler.nodes import NodePool
from services.scheduler.storage import ResultStores
from services.scheduler.store import Store, ensure_succeeded
from services.scheduler.store.webhooks import message_id_from_name
from services.scheduler.stream_caps import StreamCaps

Context = grpc.aio.ServicerContext[object, object]
MAX_PAGE = 500
MAX_PURGE = 1000


def _job_id(name: str) -> str:
    job_id = job_id_from_name(name)
    if job_id is None:
        # A malformed name cannot name anyone's job.
        raise not_found(f"job {name!r}")
    return job_id


def _batch(name: str) -> str:
    batch_id = batch_id_from_name(name)
    if batch_id is None:
        raise not_found(f"batch {name!r}")
    return BATCH_PREFIX + batch_id


def _page_size(page_size: int, page_token: str) -> int:
    size = page_size or 50
    if not 1 <= size <= MAX_PAGE:
        raise invalid_argument("page_size", f"must be 1-{MAX_PAGE}")
    if page_token and not page_token.isdigit():
        raise invalid_argument("page_token", "not a token this service issued")
    return size


class CutoutServicer(pb_grpc.CutoutServiceServicer):
    def __init__(
        self, store: Store, pool: NodePool, results: ResultStores, streams: StreamCaps
    ) -> None:
        self.store = store
        self.pool = pool
        self.results = results
        self.streams = streams  # open WatchJob and WatchBatch calls

    async def SubmitJob(
        self, request: pb.SubmitJobRequest, context: Context
    ) -> pb.SubmitJobResponse:
        raise _gateway_only("SubmitJob")

    async def SubmitBatch(
        self, request: pb.SubmitBatchRequest, context: Context
    ) -> pb.SubmitBatchResponse:
        raise _gateway_only("SubmitBatch")

    async def GetJob(self, request: pb.GetJobRequest, context: Context) -> pb.GetJobResponse:
        job = await self.store.jobs.get(current_vendor(), _job_id(request.name))
        return pb.GetJobResponse(job=job)

    async def WatchJob(
        self, request: pb.WatchJobRequest, context: Context
    ) -> AsyncIterator[pb.WatchJobResponse]:
        vendor = current_vendor()
        with self.streams.hold(vendor, context):
            async for job in self.store.jobs.watch(vendor, _job_id(request.name)):
                response = pb.WatchJobResponse()
                response.event.job.CopyFrom(job)
                response.event.event_time.CopyFrom(job.update_time)
                yield response

    async def ListJobs(self, request: pb.ListJobsRequest, context: Context) -> pb.ListJobsResponse:
        size = _page_size(request.page_size, request.page_token)
        jobs, token = await self.store.jobs.page(
            current_vendor(), request.state, size, request.page_token
        )
        return pb.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def CancelJob(
        self, request: pb.CancelJobRequest, context: Context
    ) -> pb.CancelJobResponse:
        job = await self.store.cancellation.cancel(current_vendor(), _job_id(request.name))
        return pb.CancelJobResponse(job=job)

    async def GetResult(
        self, request: pb.GetResultRequest, context: Context
    ) -> AsyncIterator[pb.GetResultResponse]:
        job = await self.store.jobs.get(current_vendor(), _job_id(request.name))
        ensure_succeeded(job)
        first = True
        try:
            # A result kept by a remote store (Cloudinary) is not read here: that is a
            # storage.ResultElsewhere (FAILED_PRECONDITION) naming its URL.
            async for chunk in self.results.read(job.result.uri):
                yield pb.GetResultResponse(result=job.result if first else None, chunk=chunk)
                first = False
        except FileNotFoundError:
            raise DataLoss(f"the stored output of {job.name} is missing") from None

    async def ListWebhookDeliveries(
        self, request: pb.ListWebhookDeliveriesRequest, context: Context
    ) -> pb.ListWebhookDeliveriesResponse:
        size = _page_size(request.page_size, request.page_token)
        deliveries, token = await self.store.webhooks.page(
            current_vendor(), size, request.page_token
        )
        return pb.ListWebhookDeliveriesResponse(deliveries=deliveries, next_page_token=token)

    async def GetWebhookDelivery(
        self, request: pb.GetWebhookDeliveryRequest, context: Context
    ) -> pb.GetWebhookDeliveryResponse:
        message_id = message_id_from_name(request.name)
        delivery = await self.store.webhooks.get(current_vendor(), message_id)
        return pb.GetWebhookDeliveryResponse(delivery=delivery)

    async def RedeliverWebhook(
        self, request: pb.RedeliverWebhookRequest, context: Context
    ) -> pb.RedeliverWebhookResponse:
        message_id = message_id_from_name(request.name)
        delivery = await self.store.webhooks.redeliver(current_vendor(), message_id)
        return pb.RedeliverWebhookResponse(delivery=delivery)

    async def GetQueueStats(
        self, request: pb.GetQueueStatsRequest, context: Context
    ) -> pb.GetQueueStatsResponse:
        stats = await self.store.stats.queue(current_vendor())
        stats.healthy_nodes, stats.capacity, stats.in_flight = self.pool.totals()
        for (model, runtime, device, precision), nodes in sorted(self.pool.runtimes().items()):
            stats.runtimes.add(
                model=model, runtime=runtime, device=device, precision=precision, nodes=nodes
            )
        return pb.GetQueueStatsResponse(stats=stats)

    async def WatchBatch(
        self, request: pb.WatchBatchRequest, context: Context
    ) -> AsyncIterator[pb.WatchBatchResponse]:
        vendor = current_vendor()
        with self.streams.hold(vendor, context):
            async for progress in self.store.batches.watch(vendor, _batch(request.name)):
                yield pb.WatchBatchResponse(batch=progress)

    async def CancelBatch(
        self, request: pb.CancelBatchRequest, context: Context
    ) -> pb.CancelBatchResponse:
        cancelled, progress = await self.store.batches.cancel(
            current_vendor(), _batch(request.name)
        )
        return pb.CancelBatchResponse(cancelled=cancelled, batch=progress)

    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: Context
    ) -> pb.ListDeadLettersResponse:
        size = _page_size(request.page_size, request.page_token)
        jobs, token = await self.store.dead_letters.page(current_vendor(), size, request.page_token)
        return pb.ListDeadLettersResponse(jobs=jobs, next_page_token=token)

    async def RequeueDeadLetter(
        self, request: pb.RequeueDeadLetterRequest, context: Context
    ) -> pb.RequeueDeadLetterResponse:
        job = await self.store.dead_letters.requeue(current_vendor(), _job_id(request.name))
        return pb.RequeueDeadLetterResponse(job=job)

    async def PurgeDeadLetters(
        self, request: pb.PurgeDeadLettersRequest, context: Context
    ) -> pb.PurgeDeadLettersResponse:
        if request.all == bool(request.names):
            raise invalid_argument("names", "name the jobs to purge, or set all (not both)")
        if len(request.names) > MAX_PURGE:
            raise invalid_argument("names", f"at most {MAX_PURGE} per call")
        ids = None
        if not request.all:
            ids = []
            for i, name in enumerate(request.names):
                job_id = job_id_from_name(name)
                if job_id is None:
                    raise invalid_argument(f"names[{i}]", f"{name[:80]!r} is not a job name")
                ids.append(job_id)
        purged = await self.store.dead_letters.purge(current_vendor(), ids)
        return pb.PurgeDeadLettersResponse(purged_count=purged)


def _gateway_only(method: str) -> CutoutError:
    return CutoutError(
        f"{method} is served by the gateway, which authenticates, rate-limits and "
        "validates images; call the gateway's address",
        grpc.StatusCode.UNIMPLEMENTED,
    )
