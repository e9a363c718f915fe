"""SchedulerService: the gateway's door to the queues. Thin: the job store does the work."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import grpc

from cutout.names import BATCH_PREFIX, batch_id_from_name, job_id_from_name
from cutout.v1 import scheduler_service_pb2 as pb
from cutout.v1 import scheduler_service_pb2_grpc as pb_grpc
from services.common.errors import CutoutError, abort, invalid_argument, not_found
from services.scheduler.keys import MAX_PRIORITY
from services.scheduler.nodes import NodePool
from services.scheduler.storage import ResultStores, StorageError
from services.scheduler.store import NewJob, Store, ensure_succeeded

Context = grpc.aio.ServicerContext[object, object]
VENDOR_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_PAGE = 500
MAX_PURGE = 1000
MAX_ENQUEUE = 1000  # jobs per EnqueueJobs call, as SubmitBatch takes


def _vendor(vendor_id: str) -> str:
    if not VENDOR_ID.match(vendor_id):
        raise invalid_argument("vendor_id", "must be 1-64 characters of [A-Za-z0-9_-]")
    return vendor_id


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


class SchedulerServicer(pb_grpc.SchedulerServiceServicer):
    def __init__(
        self, store: Store, pool: NodePool, results: ResultStores, records: bool = False
    ) -> None:
        self.store = store
        self.pool = pool
        self.results = results
        self.records = records  # a records database is configured

    def _new_job(self, request: pb.EnqueueJobRequest) -> NewJob:
        """The request as a job to store, or the CutoutError that says what is wrong."""
        vendor = _vendor(request.vendor_id)
        sub = request.submission
        if not 0 <= sub.priority <= MAX_PRIORITY:
            raise invalid_argument("submission.priority", f"must be 0-{MAX_PRIORITY}")
        if sub.image.WhichOneof("source") != "content" or not sub.image.content:
            raise invalid_argument(
                "submission.image.content", "the scheduler takes inline image bytes only"
            )
        if sub.operation.WhichOneof("kind") is None:
            raise invalid_argument("submission.operation", "an operation is required")
        if sub.HasField("record") and not self.records:
            raise CutoutError(
                "this cluster has no records database (CUTOUT_MYSQL_URL is unset): "
                "submit without submission.record",
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        return NewJob(vendor, sub, sub.image.content, request.input_pixels, request.batch)

    async def EnqueueJob(
        self, request: pb.EnqueueJobRequest, context: Context
    ) -> pb.EnqueueJobResponse:
        try:
            new = self._new_job(request)
            job, dedup = await self.store.submissions.enqueue(
                new.vendor, new.submission, new.image, new.input_pixels, new.batch
            )
            return pb.EnqueueJobResponse(job=job, deduplicated=dedup)
        except CutoutError as err:
            await abort(context, err)

    async def EnqueueJobs(
        self, request: pb.EnqueueJobsRequest, context: Context
    ) -> pb.EnqueueJobsResponse:
        count = len(request.requests)
        if not 1 <= count <= MAX_ENQUEUE:
            await abort(
                context, invalid_argument("requests", f"send 1-{MAX_ENQUEUE} jobs, not {count}")
            )
        outcomes = [pb.EnqueueJobsOutcome() for _ in range(count)]
        valid: list[tuple[int, NewJob]] = []
        for index, item in enumerate(request.requests):
            try:
                valid.append((index, self._new_job(item)))
            except CutoutError as err:
                outcomes[index].error.CopyFrom(err.to_status())
        if valid:
            stored = await self.store.submissions.enqueue_many([new for _, new in valid])
            for (index, _), got in zip(valid, stored, strict=True):
                if isinstance(got, CutoutError):
                    outcomes[index].error.CopyFrom(got.to_status())
                else:
                    outcomes[index].accepted.job.CopyFrom(got[0])
                    outcomes[index].accepted.deduplicated = got[1]
        return pb.EnqueueJobsResponse(outcomes=outcomes)

    async def GetJob(
        self, request: pb.SchedulerServiceGetJobRequest, context: Context
    ) -> pb.SchedulerServiceGetJobResponse:
        try:
            job = await self.store.jobs.get(_vendor(request.vendor_id), _job_id(request.name))
            return pb.SchedulerServiceGetJobResponse(job=job)
        except CutoutError as err:
            await abort(context, err)

    async def WatchJob(
        self, request: pb.SchedulerServiceWatchJobRequest, context: Context
    ) -> AsyncIterator[pb.SchedulerServiceWatchJobResponse]:
        try:
            async for job in self.store.jobs.watch(
                _vendor(request.vendor_id), _job_id(request.name)
            ):
                response = pb.SchedulerServiceWatchJobResponse()
                response.event.job.CopyFrom(job)
                response.event.event_time.CopyFrom(job.update_time)
                yield response
        except CutoutError as err:
            await abort(context, err)

    async def WatchBatch(
        self, request: pb.SchedulerServiceWatchBatchRequest, context: Context
    ) -> AsyncIterator[pb.SchedulerServiceWatchBatchResponse]:
        try:
            vendor, batch = _vendor(request.vendor_id), _batch(request.name)
            async for progress in self.store.batches.watch(vendor, batch):
                yield pb.SchedulerServiceWatchBatchResponse(batch=progress)
        except CutoutError as err:
            await abort(context, err)

    async def CancelBatch(
        self, request: pb.SchedulerServiceCancelBatchRequest, context: Context
    ) -> pb.SchedulerServiceCancelBatchResponse:
        try:
            vendor, batch = _vendor(request.vendor_id), _batch(request.name)
            cancelled, progress = await self.store.batches.cancel(vendor, batch)
            return pb.SchedulerServiceCancelBatchResponse(cancelled=cancelled, batch=progress)
        except CutoutError as err:
            await abort(context, err)

    async def ListJobs(
        self, request: pb.SchedulerServiceListJobsRequest, context: Context
    ) -> pb.SchedulerServiceListJobsResponse:
        try:
            vendor = _vendor(request.vendor_id)
            size = request.page_size or 50
            if not 1 <= size <= MAX_PAGE:
                raise invalid_argument("page_size", f"must be 1-{MAX_PAGE}")
            if request.page_token and not request.page_token.isdigit():
                raise invalid_argument("page_token", "not a token this service issued")
            jobs, token = await self.store.jobs.page(
                vendor, request.state, size, request.page_token
            )
            return pb.SchedulerServiceListJobsResponse(jobs=jobs, next_page_token=token)
        except CutoutError as err:
            await abort(context, err)

    async def CancelJob(
        self, request: pb.SchedulerServiceCancelJobRequest, context: Context
    ) -> pb.SchedulerServiceCancelJobResponse:
        try:
            job = await self.store.cancellation.cancel(
                _vendor(request.vendor_id), _job_id(request.name)
            )
            return pb.SchedulerServiceCancelJobResponse(job=job)
        except CutoutError as err:
            await abort(context, err)

    async def ReadResult(
        self, request: pb.ReadResultRequest, context: Context
    ) -> AsyncIterator[pb.ReadResultResponse]:
        try:
            job = await self.store.jobs.get(_vendor(request.vendor_id), _job_id(request.name))
            ensure_succeeded(job)
            first = True
            try:
                async for chunk in self.results.read(job.result.uri):
                    yield pb.ReadResultResponse(result=job.result if first else None, chunk=chunk)
                    first = False
            except FileNotFoundError:
                raise CutoutError(
                    f"the stored output of {job.name} is missing", grpc.StatusCode.DATA_LOSS
                ) from None
            except StorageError as exc:
                # Kept by a remote store (Cloudinary): the result's uri is its URL.
                raise CutoutError(str(exc), grpc.StatusCode.FAILED_PRECONDITION) from None
        except CutoutError as err:
            await abort(context, err)

    async def GetQueueStats(
        self, request: pb.SchedulerServiceGetQueueStatsRequest, context: Context
    ) -> pb.SchedulerServiceGetQueueStatsResponse:
        try:
            vendor = _vendor(request.vendor_id) if request.vendor_id else ""
            stats = await self.store.stats.queue(vendor)
            stats.healthy_nodes, stats.capacity, stats.in_flight = self.pool.totals()
            return pb.SchedulerServiceGetQueueStatsResponse(stats=stats)
        except CutoutError as err:
            await abort(context, err)

    async def ListDeadLetters(
        self, request: pb.SchedulerServiceListDeadLettersRequest, context: Context
    ) -> pb.SchedulerServiceListDeadLettersResponse:
        try:
            vendor = _vendor(request.vendor_id)
            size = request.page_size or 50
            if not 1 <= size <= MAX_PAGE:
                raise invalid_argument("page_size", f"must be 1-{MAX_PAGE}")
            if request.page_token and not request.page_token.isdigit():
                raise invalid_argument("page_token", "not a token this service issued")
            jobs, token = await self.store.dead_letters.page(vendor, size, request.page_token)
            return pb.SchedulerServiceListDeadLettersResponse(jobs=jobs, next_page_token=token)
        except CutoutError as err:
            await abort(context, err)

    async def RequeueDeadLetter(
        self, request: pb.SchedulerServiceRequeueDeadLetterRequest, context: Context
    ) -> pb.SchedulerServiceRequeueDeadLetterResponse:
        try:
            vendor = _vendor(request.vendor_id)
            job = await self.store.dead_letters.requeue(vendor, _job_id(request.name))
            return pb.SchedulerServiceRequeueDeadLetterResponse(job=job)
        except CutoutError as err:
            await abort(context, err)

    async def PurgeDeadLetters(
        self, request: pb.SchedulerServicePurgeDeadLettersRequest, context: Context
    ) -> pb.SchedulerServicePurgeDeadLettersResponse:
        try:
            vendor = _vendor(request.vendor_id)
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
            purged = await self.store.dead_letters.purge(vendor, ids)
            return pb.SchedulerServicePurgeDeadLettersResponse(purged_count=purged)
        except CutoutError as err:
            await abort(context, err)
