"""The gateway's group commit of enqueues: plain asyncio, no network needed.

The scheduler side of EnqueueJobs is exercised through real processes by
test_api / test_batches / test_metrics; here the send function is an
in-process coroutine that records the calls it gets, so the batching rules
themselves can be checked exactly.
"""

from __future__ import annotations

import asyncio

import pytest
from google.rpc import code_pb2

from services.common.errors import CutoutError
from services.gateway.enqueue_batcher import BatchLimits, EnqueueBatcher
from services.internal.v1 import scheduler_service_pb2 as spb


class Scheduler:
    """Answers EnqueueJobs like the scheduler would; refuses vendor 'capped'."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next = False

    async def send(self, request: spb.EnqueueJobsRequest) -> spb.EnqueueJobsResponse:
        self.calls.append(len(request.jobs))
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("scheduler went away")
        reply = spb.EnqueueJobsResponse()
        for r in request.jobs:
            outcome = reply.outcomes.add()
            if r.vendor_id == "capped":
                outcome.error.code = code_pb2.RESOURCE_EXHAUSTED
                outcome.error.message = "vendor capped already has 2 jobs waiting"
            else:
                outcome.accepted.job.name = f"jobs/{r.batch}"
        return reply


def request(name: str, vendor: str = "v", size: int = 0) -> spb.JobToEnqueue:
    r = spb.JobToEnqueue(vendor_id=vendor, batch=name)
    r.submission.image.content = b"x" * size
    return r


async def test_a_lone_submit_goes_at_once_and_a_crowd_goes_together() -> None:
    scheduler = Scheduler()
    batcher = EnqueueBatcher(scheduler.send, BatchLimits(max_items=64, max_in_flight=1))
    assert (await batcher.enqueue(request("a"))).job.name == "jobs/a"
    assert scheduler.calls == [1]  # nothing waited for company

    scheduler.gate.clear()  # the scheduler is busy with the next call...
    first = asyncio.create_task(batcher.enqueue(request("b")))
    await asyncio.sleep(0)
    crowd = [asyncio.create_task(batcher.enqueue(request(f"c{i}"))) for i in range(100)]
    await asyncio.sleep(0)
    scheduler.gate.set()  # ...and the 100 that arrived meanwhile leave in two calls of <= 64
    assert (await first).job.name == "jobs/b"
    names = [(await t).job.name for t in crowd]
    assert names == [f"jobs/c{i}" for i in range(100)]  # each caller gets its own job
    assert scheduler.calls == [1, 1, 64, 36]


async def test_calls_stay_under_the_byte_limit_but_a_big_item_still_goes() -> None:
    scheduler = Scheduler()
    batcher = EnqueueBatcher(scheduler.send, BatchLimits(max_bytes=10_000, max_in_flight=1))
    scheduler.gate.clear()
    tasks = [asyncio.create_task(batcher.enqueue(request("warm")))]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(batcher.enqueue(request(f"s{i}", size=4_000))) for i in range(4)]
    tasks.append(asyncio.create_task(batcher.enqueue(request("big", size=50_000))))
    await asyncio.sleep(0)
    scheduler.gate.set()
    await asyncio.gather(*tasks)
    assert scheduler.calls == [1, 2, 2, 1]


async def test_one_refused_item_or_one_failed_call_touches_no_other_item() -> None:
    scheduler = Scheduler()
    batcher = EnqueueBatcher(scheduler.send, BatchLimits(max_in_flight=1))
    outcomes = await batcher.enqueue_all(
        [request("ok1"), request("no", vendor="capped"), request("ok2")]
    )
    assert isinstance(outcomes[0], spb.EnqueuedJob)
    assert isinstance(outcomes[1], CutoutError)  # the scheduler's status, as it came
    assert outcomes[1].to_status().code == code_pb2.RESOURCE_EXHAUSTED
    assert "2 jobs waiting" in outcomes[1].to_status().message
    assert isinstance(outcomes[2], spb.EnqueuedJob)
    assert scheduler.calls == [3]  # a batch's items go together

    scheduler.fail_next = True
    with pytest.raises(ConnectionError, match="went away"):
        await batcher.enqueue(request("lost"))
    assert (await batcher.enqueue(request("after"))).job.name == "jobs/after"
