"""Stages arrive in order, each once, and progress never goes back (issue 26, item 1).

The first job on a fresh cluster used to show COMPOSITING, ENCODING and STORING
twice: its completion was the first use of the COMPLETE script, Redis answered
NOSCRIPT, and the whole pipeline, progress update included, ran again. The
tiny model hides it (its job ends within the node's hold, so no progress write
comes before the completion and both scripts are missing together), and so
does any earlier job (the scripts are loaded by then): hence a real-model job,
the first one its cluster runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from cutout import AsyncClient
from cutout.v1 import jobs_pb2
from services.local.cluster import LocalCluster
from services.local.redis import RedisServer
from services.scheduler.keys import Keys
from services.scheduler.store import Completion, Retention, RetryPolicy, Store
from tests.conftest import KEYS

REMOVE_BACKGROUND = [
    jobs_pb2.STAGE_QUEUED,
    jobs_pb2.STAGE_DECODING,
    jobs_pb2.STAGE_INFERENCE,
    jobs_pb2.STAGE_COMPOSITING,
    jobs_pb2.STAGE_ENCODING,
    jobs_pb2.STAGE_STORING,
    jobs_pb2.STAGE_DONE,
]


def stage_runs(stages: list[int]) -> list[int]:
    """The stages with each run of repeats (a stage's percent moving on) as one."""
    runs: list[int] = []
    for stage in stages:
        if not runs or runs[-1] != stage:
            runs.append(stage)
    return runs


def names(stages: list[int]) -> list[str]:
    return [jobs_pb2.Stage.Name(s) for s in stages]


async def test_the_first_job_on_a_fresh_cluster_reports_each_stage_once_in_order(
    make_cluster: Callable[..., LocalCluster],
    real_model_dir: Path,
    photos: dict[str, bytes],
) -> None:
    cluster = make_cluster(real_model_dir, nodes=1)
    async with AsyncClient(cluster.gateway_address, KEYS["vendor-a"]) as client:
        job = await client.submit(photos["astronaut"])  # the cluster's first job
        seen = [event.job async for event in client.watch(job.name)]
    trace = [(jobs_pb2.Stage.Name(j.stage), j.progress_percent, j.attempt) for j in seen]
    assert seen[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED, trace
    assert seen[-1].attempt == 1, trace
    assert names(stage_runs([j.stage for j in seen])) == names(REMOVE_BACKGROUND), trace
    progress = [j.progress_percent for j in seen]
    assert progress == sorted(progress), f"progress went backwards: {trace}"
    assert progress[-1] == 100, trace


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
