"""Hardening of the watch hub on a real redis-server: hundreds of watchers cost a scheduler
two Redis connections of their own, each sees every change once and in order however late
it joins; a watcher that does not read is ended, not buffered without bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
import redis.asyncio as aioredis

from cutout.v1 import jobs_pb2
from services.common.errors import CutoutError
from services.local.redis import RedisServer
from services.scheduler.keys import Keys
from services.scheduler.store import Retention, RetryPolicy, Store
from tests.support.waiting import until

# --- watching: one reader per scheduler, caps per vendor and overall -------------------


@pytest.fixture
async def store(redis_server: Callable[..., RedisServer]) -> AsyncIterator[Store]:
    server = redis_server()
    # A pool of 4, as small as a starved one: watchers must not need any of it for long.
    client = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(
            server.url, max_connections=4, timeout=2, client_name="test-store"
        )
    )
    yield Store(client, Keys("h:"), Retention(), RetryPolicy(max_retries=2, base_delay_ms=100))
    await client.aclose(close_connection_pool=True)


async def enqueue(store: Store, vendor: str = "a") -> str:
    sub = jobs_pb2.JobSubmission()
    sub.operation.remove_background.model = "tiny"
    job, _ = await store.submissions.enqueue(vendor, sub, b"image-bytes", 1_000_000)
    return job.name.removeprefix("jobs/")


async def named_connections(redis: aioredis.Redis, prefix: str) -> int:
    clients = await redis.client_list()
    return sum(1 for c in clients if c.get("name", "").startswith(prefix))


async def test_hundreds_of_watchers_share_one_connection_and_see_every_event_once(
    store: Store,
) -> None:
    jobs = [await enqueue(store) for _ in range(20)]
    events: dict[int, list[jobs_pb2.Job]] = {}

    async def follow(index: int) -> None:
        events[index] = []
        async for job in store.jobs.watch("a", jobs[index % len(jobs)]):
            events[index].append(job)

    early = [asyncio.create_task(follow(i)) for i in range(200)]
    await until(lambda: len(events) == 200 and all(events.values()), "watchers replayed")
    # 200 watchers of 20 jobs: the hub's two connections (stream reader, watchers' own
    # reads), and the pool of 4 is free.
    assert await named_connections(store.redis, "test-store-watch") == 2
    started = time.perf_counter()
    for job_id in jobs[:5]:
        assert (await store.jobs.get("a", job_id)).state == jobs_pb2.JOB_STATE_QUEUED
    assert time.perf_counter() - started < 1.0
    # Run every job: claim, two progress reports, complete. Halfway, the last job has
    # moved up (no event of its own says so: the hub's tick does), and late watchers join.
    late: list[asyncio.Task[None]] = []
    for n, _ in enumerate(jobs):
        if n == 10:
            await until(lambda: events[19][-1].queue_position == 10, "the place updated")
            late = [asyncio.create_task(follow(200 + i)) for i in range(40)]
        claim = await store.claims.claim("node", 10_000)
        assert claim is not None
        await store.attempts.progress(claim, [(jobs_pb2.STAGE_INFERENCE, 20)], 10_000)
        await store.attempts.progress(claim, [(jobs_pb2.STAGE_ENCODING, 90)], 10_000)
        result = jobs_pb2.Result(uri=f"local:{claim.job_id}", content_type="image/png")
        assert await store.attempts.complete(claim, result)
    await asyncio.wait_for(asyncio.gather(*early, *late), 30)
    for index, seen in events.items():
        # QUEUED (its place changing as jobs ahead leave), RUNNING, two stages, SUCCEEDED:
        # every change once, in order, whenever the watcher arrived.
        progress = [j.progress_percent for j in seen if j.state != jobs_pb2.JOB_STATE_QUEUED]
        assert progress == [0, 20, 90, 100], (index, [(j.state, j.progress_percent) for j in seen])
        assert seen[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED
        positions = [j.queue_position for j in seen if j.state == jobs_pb2.JOB_STATE_QUEUED]
        assert positions == sorted(positions, reverse=True) and len(set(positions)) == len(
            positions
        )
    # Nobody watches any more: the hub hands its connection back.
    deadline = time.monotonic() + 10
    while await named_connections(store.redis, "test-store-watch"):
        assert time.monotonic() < deadline, "the hub kept its connection"
        await asyncio.sleep(0.05)


async def test_a_watcher_that_does_not_read_is_ended_not_buffered(store: Store) -> None:
    job_id = await enqueue(store)
    watch = store.jobs.watch("a", job_id)
    assert (await anext(watch)).state == jobs_pb2.JOB_STATE_QUEUED  # the history
    following = asyncio.ensure_future(anext(watch))  # now it follows the stream...
    claim = await store.claims.claim("node", 10_000)
    assert claim is not None
    assert (await asyncio.wait_for(following, 10)).state == jobs_pb2.JOB_STATE_RUNNING
    for percent in range(1, 300):  # ...and stops reading
        await store.attempts.progress(claim, [(jobs_pb2.STAGE_INFERENCE, percent % 100)], 10_000)

    async def read_on() -> None:
        async for _ in watch:
            pass

    with pytest.raises(CutoutError) as ended:
        await asyncio.wait_for(read_on(), 30)
    assert ended.value.code == grpc.StatusCode.ABORTED
    assert "watch again" in ended.value.message
