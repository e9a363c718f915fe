"""Stages are written once each (issue 26, item 1): a completion that loads its script on a
real redis-server writes its progress once. The first real-model job on a fresh cluster:
tests/cluster/test_stage_order.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from cutout.v1 import jobs_pb2
from services.local.redis import RedisServer
from services.scheduler.keys import Keys
from services.scheduler.store import Completion, Retention, RetryPolicy, Store


def names(stages: list[int]) -> list[str]:
    return [jobs_pb2.Stage.Name(s) for s in stages]


@pytest.fixture
async def store(redis_server: Callable[..., RedisServer]) -> AsyncIterator[Store]:
    client = aioredis.from_url(redis_server().url)
    yield Store(client, Keys("t:"), Retention(), RetryPolicy())
    await client.aclose()


async def events_of(store: Store, job_id: str) -> list[int]:
    entries = await store.redis.xrange(store.keys.events(job_id))
    return [int(fields[b"stage"]) for _, fields in entries if b"stage" in fields]


async def test_a_completion_that_loads_its_script_writes_its_progress_once(store: Store) -> None:
    """Redis without the COMPLETE script (fresh, or restarted) but with PROGRESS, which a
    running job's progress write loads: the completion's stages are recorded once."""
    sub = jobs_pb2.JobSubmission()
    sub.operation.remove_background.model = "tiny"
    job, _ = await store.submissions.enqueue("a", sub, b"image-bytes", 1_000_000)
    job_id = job.name.removeprefix("jobs/")
    claim = await store.claims.claim("node", 10_000)
    assert claim is not None and claim.job_id == job_id
    assert await store.attempts.progress(claim, [(jobs_pb2.STAGE_INFERENCE, 20)], 10_000)
    updates = [(jobs_pb2.STAGE_COMPOSITING, 75), (jobs_pb2.STAGE_STORING, 95)]
    result = jobs_pb2.Result(content_type="image/png", uri="local:a/x.png")
    completion = Completion(claim, result, False, updates, 10_000)
    assert await store.attempts.complete_many([completion]) == [True]
    assert names(await events_of(store, job_id)) == names(
        [
            jobs_pb2.STAGE_QUEUED,
            jobs_pb2.STAGE_DECODING,  # the claim
            jobs_pb2.STAGE_INFERENCE,
            jobs_pb2.STAGE_COMPOSITING,
            jobs_pb2.STAGE_STORING,
            jobs_pb2.STAGE_DONE,
        ]
    )
    finished = await store.jobs.get("a", job_id)
    assert finished.state == jobs_pb2.JOB_STATE_SUCCEEDED and finished.progress_percent == 100
