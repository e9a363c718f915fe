"""The delivery outbox on a private redis-server: the result switch and delivery backoff."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from cutout.v1 import jobs_pb2
from services.local.redis import RedisServer
from services.scheduler.keys import Keys
from services.scheduler.store import Retention, Store, Switched


@pytest.fixture
async def store(redis_server: Callable[..., RedisServer]) -> AsyncIterator[Store]:
    client = aioredis.from_url(redis_server().url)
    yield Store(client, Keys("o:"), Retention(finished_s=3600))
    await client.aclose()


async def succeeded(store: Store, uri: str = "", deliver: bool = True) -> str:
    """A job that succeeded with its output at uri (default local:v/<id>.png)."""
    sub = jobs_pb2.JobSubmission()
    sub.operation.remove_background.model = "tiny"
    job, _ = await store.submissions.enqueue("v", sub, b"input", 64)
    job_id = job.name.removeprefix("jobs/")
    claim = await store.claims.claim("node", 10_000)
    assert claim is not None and claim.job_id == job_id
    result = jobs_pb2.Result(uri=uri or f"local:v/{job_id}.png", content_type="image/png")
    assert await store.attempts.complete(claim, result, deliver=deliver)
    return job_id


async def test_of_two_racing_switches_exactly_one_wins(store: Store) -> None:
    job_id = await succeeded(store)
    local_deadline = await store.blobs.deadline_ms(f"local:v/{job_id}.png")
    assert local_deadline is not None
    # Two deliverers read the job before either switches it.
    (a,), _ = await store.outbox.load([job_id])
    (b,), _ = await store.outbox.load([job_id])
    outcomes = await asyncio.gather(
        store.outbox.switch_result(a, "https://cdn/a.png"),
        store.outbox.switch_result(b, "https://cdn/b.png"),
    )
    assert sorted(outcomes) == [Switched.MOVED_ON, Switched.SWITCHED]
    winner = "https://cdn/a.png" if outcomes[0] == Switched.SWITCHED else "https://cdn/b.png"
    # The loser now holds the job's result as it is: the winner's.
    assert a.result.uri == b.result.uri == winner
    job = await store.jobs.get("v", job_id)
    assert job.result.uri == winner and job.result.content_type == "image/png"
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED
    watched = [j async for j in store.jobs.watch("v", job_id)]
    assert watched[-1].result.uri == winner
    assert watched[-1].update_time == job.update_time
    # The winner's URI took over the local copy's deadline; the loser's was never kept;
    # the local copy, pointed at by nothing now, is due for deletion at once.
    assert await store.blobs.deadline_ms(winner) == local_deadline
    loser = "https://cdn/b.png" if winner.endswith("a.png") else "https://cdn/a.png"
    assert await store.blobs.deadline_ms(loser) is None
    assert await store.blobs.expired() == [f"local:v/{job_id}.png"]


async def test_a_switch_for_an_expired_job_leaves_its_upload_to_the_sweeper(store: Store) -> None:
    job_id = await succeeded(store)
    (delivery,), _ = await store.outbox.load([job_id])
    await store.redis.delete(store.keys.job(job_id))
    assert await store.outbox.switch_result(delivery, "https://cdn/x.png") == Switched.GONE
    assert not await store.redis.exists(store.keys.job(job_id))  # not revived as a stub
    # Nothing points at the upload: the sweeper deletes it at once.
    assert "https://cdn/x.png" in await store.blobs.expired()
    assert await store.outbox.load([job_id]) == ([], [job_id])


async def test_later_backs_off_per_delivery_and_never_revives_a_finished_one(
    store: Store,
) -> None:
    first, second = await succeeded(store), await succeeded(store)
    assert sorted(await store.outbox.claim(10)) == sorted([first, second])
    # Whole milliseconds, as Redis's TIME gives the script (a fraction made this flaky).
    before = int(time.time() * 1000)
    await store.outbox.later([first], base_ms=1000)
    await store.outbox.later([first], base_ms=1000)  # its second failure: twice as long
    due = await store.redis.zscore(store.keys.deliveries, first)
    assert due is not None and before + 2000 <= due <= time.time() * 1000 + 2000
    # Another deliverer finished `second` meanwhile: a late `later` leaves it finished.
    await store.outbox.done([second])
    await store.outbox.later([second], base_ms=1000)
    assert await store.redis.zscore(store.keys.deliveries, second) is None
    assert not await store.redis.hexists(store.keys.delivery_tries, second)
    assert await store.outbox.pending() == 1
