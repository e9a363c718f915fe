"""The internal `cutout.internal.v1.SchedulerService`: the gateway's door to the queues.

Only the gateway calls it (with the internal token, see
services/common/internal_auth.py), after authenticating each job's vendor,
taking its quotas and validating its image. The checks here are the ones
the queues themselves rely on.
"""

from __future__ import annotations

import grpc

from services.common.errors import CutoutError, FailedPrecondition, invalid_argument
from services.common.identity import ID_RULE, VENDOR_ID
from services.common.operations import PRIORITIES, PRIORITY_RULE
from services.internal.v1 import scheduler_service_pb2 as pb
from services.internal.v1 import scheduler_service_pb2_grpc as pb_grpc
from services.scheduler.store import NewJob, Store

Context = grpc.aio.ServicerContext[object, object]
MAX_ENQUEUE = 1000  # jobs per EnqueueJobs call, as SubmitBatch takes


class SchedulerServicer(pb_grpc.SchedulerServiceServicer):
    def __init__(self, store: Store, records: bool = False) -> None:
        self.store = store
        self.records = records  # a records database is configured

    def _new_job(self, item: pb.JobToEnqueue) -> NewJob:
        """The item as a job to store, or the CutoutError that says what is wrong.

        Field paths are the vendor's (`submission.priority`): the gateway hands
        each job's refusal back as that submission's own error.
        """
        if not VENDOR_ID.match(item.vendor_id):
            raise invalid_argument("vendor_id", f"must be {ID_RULE}")
        sub = item.submission
        if sub.priority not in PRIORITIES:
            raise invalid_argument("submission.priority", PRIORITY_RULE)
        if sub.image.WhichOneof("source") != "content" or not sub.image.content:
            raise invalid_argument(
                "submission.image.content", "the scheduler takes inline image bytes only"
            )
        if sub.operation.WhichOneof("kind") is None:
            raise invalid_argument("submission.operation", "an operation is required")
        if sub.HasField("record") and not self.records:
            raise FailedPrecondition(
                "this cluster has no records database (CUTOUT_MYSQL_URL is unset): "
                "submit without submission.record"
            )
        return NewJob(item.vendor_id, sub, sub.image.content, item.input_pixels, item.batch)

    async def EnqueueJobs(
        self, request: pb.EnqueueJobsRequest, context: Context
    ) -> pb.EnqueueJobsResponse:
        count = len(request.jobs)
        if not 1 <= count <= MAX_ENQUEUE:
            raise invalid_argument("jobs", f"send 1-{MAX_ENQUEUE} jobs, not {count}")
        outcomes = [pb.EnqueueOutcome() for _ in range(count)]
        valid: list[tuple[int, NewJob]] = []
        for index, item in enumerate(request.jobs):
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
