"""The scheduler's queue rules, on a private redis-server with no gRPC in the way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis

from cutout.v1 import jobs_pb2
from services.common.errors import CutoutError, status_from_code
from services.common.internal_auth import InternalToken, new_token
from services.internal.v1 import inference_service_pb2 as pb
from services.local.redis import RedisServer
from services.scheduler.attempt import DispatchPolicy
from services.scheduler.dispatcher import Dispatcher
from services.scheduler.keys import Keys
from services.scheduler.nodes import NodePool
from services.scheduler.storage import LocalResultStore, ResultStores
from services.scheduler.store import (
    Admission,
    Charge,
    Claim,
    Completion,
    Fairness,
    NewJob,
    Retention,
    Retried,
    RetryPolicy,
    Store,
)
from services.scheduler.work_link import WorkLink


@pytest.fixture
async def store(redis_server: Callable[..., RedisServer]) -> AsyncIterator[Store]:
    server = redis_server()
    client = aioredis.from_url(server.url)
    # Short backoff so retries are observable without slow tests.
    yield Store(client, Keys("t:"), Retention(), RetryPolicy(max_retries=2, base_delay_ms=100))
    await client.aclose()


def submission(priority: int = 0, client_key: str = "") -> jobs_pb2.JobSubmission:
    sub = jobs_pb2.JobSubmission(priority=priority, client_key=client_key)
    sub.operation.remove_background.model = "tiny"
    return sub


async def enqueue(store: Store, vendor: str, priority: int = 0, pixels: int = 1_000_000) -> str:
    job, _ = await store.submissions.enqueue(vendor, submission(priority), b"image-bytes", pixels)
    return job.name.removeprefix("jobs/")


async def drain(store: Store) -> list[Claim]:
    """Claim until the queues are empty (deterministic: no sleeping)."""
    claims: list[Claim] = []
    while (claim := await store.claims.claim("node", 10_000)) is not None:
        claims.append(claim)
    return claims


async def test_vendors_are_served_round_robin_not_by_arrival(store: Store) -> None:
    # 1-megapixel jobs cost exactly one turn's credit (quantum 1 MP): strict alternation.
    flood = [await enqueue(store, "a") for _ in range(50)]
    late = [await enqueue(store, "b") for _ in range(3)]
    order = [c.vendor for c in await drain(store)]
    # b's three jobs go in the first six dispatches, not after a's fifty.
    assert order[:6] == ["a", "b", "a", "b", "a", "b"]
    assert sorted(c for c in order) == sorted(["a"] * len(flood) + ["b"] * len(late))


async def test_fair_share_is_counted_in_megapixels(store: Store) -> None:
    # a sends 4 MP photos, b 0.5 MP ones: per megapixel served they stay even.
    for _ in range(20):
        await enqueue(store, "a", pixels=4_000_000)
        await enqueue(store, "b", pixels=500_000)
    served = {"a": 0, "b": 0}
    for claim in (await drain(store))[:20]:
        served[claim.vendor] += 4_000_000 if claim.vendor == "a" else 500_000
    assert 0.6 <= served["a"] / served["b"] <= 1.7, served


async def test_weights_give_proportional_shares(redis_server: Callable[..., RedisServer]) -> None:
    client = aioredis.from_url(redis_server().url)
    store = Store(client, Keys("w:"), Retention(), fairness=Fairness(weights={"gold": 3.0}))
    await store.claims.publish_weights()
    for _ in range(40):
        await enqueue(store, "gold")
        await enqueue(store, "basic")
    first = [c.vendor for c in (await drain(store))[:40]]
    assert first.count("gold") == 30 and first.count("basic") == 10
    await client.aclose()


async def test_a_flood_never_delays_another_vendor_more_than_one_round(store: Store) -> None:
    for _ in range(300):
        await enqueue(store, "flood", pixels=200_000)  # 5 per turn
    claims = [await store.claims.claim("node", 10_000) for _ in range(7)]
    assert {c.vendor for c in claims if c} == {"flood"}
    await enqueue(store, "small")
    order = [c.vendor for c in await drain(store)]
    assert "small" in order[:5]  # within the rest of flood's current turn


async def test_priority_first_then_fifo_within_a_vendor(store: Store) -> None:
    low1 = await enqueue(store, "a", 0)
    high = await enqueue(store, "a", 9)
    low2 = await enqueue(store, "a", 0)
    mid = await enqueue(store, "a", 5)
    assert [c.job_id for c in await drain(store)] == [high, mid, low1, low2]


async def test_queue_position_eta_and_stats(store: Store) -> None:
    ids = [await enqueue(store, "a", p) for p in (0, 0, 3)]
    assert [(await store.jobs.place("a", i)).position for i in ids] == [2, 3, 1]
    # No job has run yet: no basis for an ETA, so none is given.
    assert not (await store.jobs.get("a", ids[0])).HasField("estimated_wait")
    stats = await store.stats.queue("a")
    assert stats.queued == 3
    assert [(p.priority, p.queued) for p in stats.by_priority] == [(3, 1), (0, 2)]
    claim = await store.claims.claim("node", 10_000)
    assert claim is not None and claim.job_id == ids[2]
    stats = await store.stats.queue("")
    assert (stats.queued, stats.running, stats.attempts_started) == (2, 1, 1)
    await asyncio.sleep(0.2)
    assert await store.attempts.complete(claim, jobs_pb2.Result(uri="local:x"))
    # One job ran for ~200 ms on a fleet of 1 slot: the 2nd in line waits ~2 runs.
    job = await store.jobs.get("a", ids[1])
    assert job.queue_position == 2
    eta_ms = job.estimated_wait.ToMilliseconds()
    assert 2 * 150 <= eta_ms <= 2 * 1000, eta_ms
    doubled = Store(store.redis, store.keys, fleet_capacity=lambda lane: 2)
    # Twice the slots: half the wait.
    assert (await doubled.jobs.get("a", ids[1])).estimated_wait.ToMilliseconds() == eta_ms // 2
    stats = await store.stats.queue("a")
    assert (stats.succeeded, stats.running, stats.lease_losses) == (1, 0, 0)


async def test_light_jobs_have_their_own_queue_position_and_eta(store: Store) -> None:
    heavy = [await enqueue(store, "a") for _ in range(3)]
    light_sub = jobs_pb2.JobSubmission()
    light_sub.operation.transform.format = jobs_pb2.OUTPUT_FORMAT_JPEG
    light = [
        (await store.submissions.enqueue("a", light_sub, b"x", 1000))[0].name[5:] for _ in range(2)
    ]
    assert [(await store.jobs.get("a", j)).queue_position for j in light] == [1, 2]
    assert (await store.jobs.get("a", heavy[2])).queue_position == 3
    # The inference lane never hands out a light job, nor the light lane an inference one.
    claim = await store.claims.claim("node", 10_000, "light:")
    assert claim is not None and claim.job_id == light[0]
    await store.attempts.complete(claim, jobs_pb2.Result(uri="local:x"))  # runs in ~0 ms
    slow = await store.claims.claim("node", 10_000)
    assert slow is not None and slow.job_id == heavy[0]
    await asyncio.sleep(0.3)
    await store.attempts.complete(slow, jobs_pb2.Result(uri="local:y"))
    # Each lane's ETA comes from its own run times: a fast transform does not
    # make the inference queue look short.
    heavy_eta = (await store.jobs.get("a", heavy[2])).estimated_wait.ToMilliseconds()
    light_eta = (await store.jobs.get("a", light[1])).estimated_wait.ToMilliseconds()
    assert heavy_eta >= 250 and light_eta < 100, (heavy_eta, light_eta)


async def test_idempotency_key_is_per_vendor(store: Store) -> None:
    first, dup1 = await store.submissions.enqueue("a", submission(client_key="k"), b"x", 1)
    again, dup2 = await store.submissions.enqueue("a", submission(client_key="k"), b"x", 1)
    other, dup3 = await store.submissions.enqueue("b", submission(client_key="k"), b"x", 1)
    assert (dup1, dup2, dup3) == (False, True, False)
    assert first.name == again.name != other.name


async def test_a_late_answer_from_an_old_attempt_is_ignored(store: Store) -> None:
    job_id = await enqueue(store, "a")
    claim = await store.claims.claim("node-1", 10_000)
    assert claim is not None and claim.attempt == 1
    unavailable = status_from_code(grpc.StatusCode.UNAVAILABLE, "x")
    assert await store.attempts.retry(claim, unavailable) == Retried.RETRYING
    second = await claim_after_backoff(store)
    assert second is not None and second.attempt == 2
    # The first attempt's node answers after all: fenced off, changes nothing.
    assert not await store.attempts.progress(claim, [(jobs_pb2.STAGE_INFERENCE, 50)], 10_000)
    assert not await store.attempts.complete(claim, jobs_pb2.Result(uri="local:old"))
    assert await store.attempts.complete(second, jobs_pb2.Result(uri="local:new"))
    job = await store.jobs.get("a", job_id)
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED and job.result.uri == "local:new"
    assert await store.jobs.input_image(job_id) is None  # input freed once done


async def claim_after_backoff(store: Store, lease_ms: int = 10_000) -> Claim | None:
    """Wait out a retry's backoff (the store's policy: 100 ms, doubling) and claim."""
    for _ in range(100):
        await store.attempts.promote()
        claim = await store.claims.claim("node", lease_ms)
        if claim is not None:
            return claim
        await asyncio.sleep(0.02)
    return None


async def test_expired_leases_back_off_free_then_count_then_dead_letter(store: Store) -> None:
    # An expired lease is the cluster's fault (its scheduler died or lost Redis): it does
    # not use up a retry, up to max_free per job; beyond that even those count.
    store = Store(
        store.redis,
        store.keys,
        Retention(),
        RetryPolicy(max_retries=1, base_delay_ms=100, max_free=2),
    )
    job_id = await enqueue(store, "a")
    claim = await store.claims.claim("node", 50)
    for attempt in (1, 2, 3):  # two free retries, then the one retry max_retries allows
        assert claim is not None and claim.attempt == attempt
        await asyncio.sleep(0.1)
        assert await store.attempts.reap() == [job_id]
        job = await store.jobs.get("a", job_id)
        assert job.state == jobs_pb2.JOB_STATE_QUEUED and job.HasField("retry_time")
        assert await store.claims.claim("node", 50) is None  # still backing off
        claim = await claim_after_backoff(store, lease_ms=50)
    assert claim is not None and claim.attempt == 4
    await asyncio.sleep(0.1)
    await store.attempts.reap()
    job = await store.jobs.get("a", job_id)
    assert job.state == jobs_pb2.JOB_STATE_FAILED and job.dead_lettered
    assert job.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "lease expired" in job.error.message
    assert await store.jobs.input_image(job_id) == b"image-bytes"  # kept for a requeue
    stats = await store.stats.queue("a")
    assert (stats.attempts_started, stats.lease_losses) == (4, 4)
    assert (stats.retries, stats.dead_lettered, stats.succeeded) == (3, 1, 0)


async def test_stored_outputs_expire_with_their_jobs(
    redis_server: Callable[..., RedisServer],
) -> None:
    redis = aioredis.from_url(redis_server().url)
    store = Store(redis, Keys("retention:"), Retention(finished_s=1))
    lost_id = await enqueue(store, "a")
    lost = await store.claims.claim("node", 10_000)
    assert lost is not None
    # Its attempt finishes anyway: fenced off, output stored.
    await store.cancellation.cancel("a", lost_id)
    assert not await store.attempts.complete(lost, jobs_pb2.Result(uri="local:a/orphan.png"))
    job_id = await enqueue(store, "a")
    claim = await store.claims.claim("node", 10_000)
    assert claim is not None
    assert await store.attempts.complete(claim, jobs_pb2.Result(uri=f"local:a/{job_id}.png"))
    assert await store.blobs.expired() == []
    await asyncio.sleep(1.1)
    due = set(await store.blobs.expired())
    assert due == {"local:a/orphan.png", f"local:a/{job_id}.png"}
    await store.blobs.forget(list(due))
    assert await store.blobs.expired() == []
    await redis.aclose()


async def test_backoff_doubles_with_jitter(store: Store) -> None:
    await enqueue(store, "a")
    delays = []
    for _ in range(2):
        claim = await claim_after_backoff(store)
        assert claim is not None
        before = time.time() * 1000
        await store.attempts.retry(claim, status_from_code(grpc.StatusCode.INTERNAL, "boom"))
        job = await store.jobs.get("a", claim.job_id)
        delays.append(job.retry_time.ToMilliseconds() - before)
    assert 80 - 5 <= delays[0] <= 120 + 5  # 100 ms +/- 20%
    assert 160 - 5 <= delays[1] <= 240 + 5  # doubled


async def test_dead_letters_list_requeue_and_purge(store: Store) -> None:
    ids = []
    for _ in range(3):
        job_id = await enqueue(store, "a")
        ids.append(job_id)
    for _ in range(9):  # every attempt of every job fails until dead-lettered
        claim = await claim_after_backoff(store)
        if claim is None:
            break
        await store.attempts.retry(
            claim, status_from_code(grpc.StatusCode.INTERNAL, f"boom {claim.attempt}")
        )
    page, token = await store.dead_letters.page("a", 2, "")
    rest, last = await store.dead_letters.page("a", 2, token)
    assert token and not last
    assert sorted(j.name.removeprefix("jobs/") for j in page + rest) == sorted(ids)
    assert all(
        j.dead_lettered and j.attempt == 3 and "boom 3" in j.error.message for j in page + rest
    )
    assert (await store.dead_letters.page("b", 10, ""))[0] == []  # another vendor sees none

    requeued = await store.dead_letters.requeue("a", ids[0])
    assert requeued.state == jobs_pb2.JOB_STATE_QUEUED and requeued.attempt == 0
    assert not requeued.dead_lettered and not requeued.HasField("error")
    claim = await store.claims.claim("node", 10_000)
    assert claim is not None and claim.job_id == ids[0] and claim.attempt == 1
    assert await store.attempts.complete(claim, jobs_pb2.Result(uri="local:ok"))

    with pytest.raises(CutoutError):
        await store.dead_letters.requeue("b", ids[1])  # not b's
    assert (
        await store.dead_letters.purge("a", [ids[1], ids[0]]) == 1
    )  # ids[0] is no dead letter now
    assert await store.jobs.input_image(ids[1]) is None
    assert await store.dead_letters.purge("a", None) == 1
    assert (await store.dead_letters.page("a", 10, ""))[0] == []
    with pytest.raises(CutoutError):
        await store.dead_letters.requeue("a", ids[2])


async def test_progress_never_goes_backwards(store: Store) -> None:
    await enqueue(store, "a")
    claim = await store.claims.claim("node", 10_000)
    assert claim is not None
    await store.attempts.progress(claim, [(jobs_pb2.STAGE_INFERENCE, 60)], 10_000)
    await store.attempts.progress(claim, [(jobs_pb2.STAGE_INFERENCE, 20)], 10_000)
    job = await store.jobs.get("a", claim.job_id)
    assert job.progress_percent == 60


async def test_cancel_running_job_fences_its_attempt(store: Store) -> None:
    await enqueue(store, "a")
    claim = await store.claims.claim("node", 10_000)
    assert claim is not None
    with pytest.raises(CutoutError):
        await store.cancellation.cancel("b", claim.job_id)  # not b's job
    job = await store.cancellation.cancel("a", claim.job_id)
    assert job.state == jobs_pb2.JOB_STATE_CANCELLED
    assert not await store.attempts.complete(claim, jobs_pb2.Result(uri="local:x"))
    assert (await store.stats.queue("a")).running == 0


async def test_watch_replays_history_for_a_late_watcher(store: Store) -> None:
    job_id = await enqueue(store, "a")
    claim = await store.claims.claim("node", 10_000)
    assert claim is not None
    await store.attempts.progress(claim, [(jobs_pb2.STAGE_INFERENCE, 20)], 10_000)
    await store.attempts.complete(claim, jobs_pb2.Result(uri="local:r", content_type="image/png"))
    seen = [job async for job in store.jobs.watch("a", job_id)]
    assert [j.state for j in seen] == [
        jobs_pb2.JOB_STATE_QUEUED,
        jobs_pb2.JOB_STATE_RUNNING,
        jobs_pb2.JOB_STATE_RUNNING,
        jobs_pb2.JOB_STATE_SUCCEEDED,
    ]
    assert [j.progress_percent for j in seen] == [0, 0, 20, 100]
    assert seen[-1].result.uri == "local:r"


async def test_a_refused_attempt_does_not_count(store: Store) -> None:
    job_id = await enqueue(store, "a")
    for _ in range(5):  # more refusals than max_retries would allow failures
        claim = await store.claims.claim("node", 10_000)
        assert claim is not None and claim.attempt == 1
        full = status_from_code(grpc.StatusCode.RESOURCE_EXHAUSTED, "node is full")
        assert await store.attempts.retry(claim, full, Charge.REFUNDED) == Retried.REQUEUED
    job = await store.jobs.get("a", job_id)
    assert job.state == jobs_pb2.JOB_STATE_QUEUED and job.attempt == 0


async def test_admission_caps_shed_load_per_vendor_and_globally(
    redis_server: Callable[..., RedisServer],
) -> None:
    redis = aioredis.from_url(redis_server().url)
    store = Store(
        redis, Keys("cap:"), Retention(), admission=Admission(max_queued_per_vendor=3, max_queued=5)
    )
    for _ in range(3):
        await enqueue(store, "a")
    with pytest.raises(CutoutError, match="vendor a already has 3 jobs waiting") as full:
        await enqueue(store, "a")
    assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and full.value.retry_after_s
    # A repeated submission is answered from its idempotency key, even when full.
    first, _ = await store.submissions.enqueue("b", submission(client_key="k"), b"x", 1)
    await enqueue(store, "b")
    with pytest.raises(CutoutError, match="the cluster has 5 jobs waiting"):
        await enqueue(store, "c")
    again, deduplicated = await store.submissions.enqueue("b", submission(client_key="k"), b"x", 1)
    assert deduplicated and again.name == first.name
    # Once a job starts, there is room again.
    assert await store.claims.claim("node", 10_000) is not None
    await enqueue(store, "c")
    await redis.aclose()


async def test_jobs_enqueued_together_keep_their_own_outcomes(store: Store) -> None:
    """One round trip for many jobs; a capped or repeated one does not affect the others."""
    store = Store(store.redis, store.keys, admission=Admission(max_queued_per_vendor=2))
    first, _ = await store.submissions.enqueue("a", submission(client_key="k1"), b"image-bytes", 10)
    got = await store.submissions.enqueue_many(
        [
            NewJob("a", submission(), b"image-bytes", 10),  # a's second: fits
            NewJob("a", submission(), b"image-bytes", 10),  # a's third: over a's cap of 2
            NewJob("a", submission(client_key="k1"), b"image-bytes", 10),  # a repeat of `first`
            NewJob("b", submission(priority=3), b"image-bytes", 10),  # b has its own cap
        ]
    )
    second, repeat, other = got[0], got[2], got[3]
    assert isinstance(second, tuple) and isinstance(repeat, tuple) and isinstance(other, tuple)
    assert second[1] is False and second[0].queue_position == 2
    assert second[0].state == jobs_pb2.JOB_STATE_QUEUED
    capped = got[1]
    assert isinstance(capped, CutoutError)
    assert capped.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 jobs waiting" in capped.message
    assert repeat[1] is True and repeat[0].name == first.name and repeat[0].queue_position == 1
    assert other[1] is False and other[0].queue_position == 1 and other[0].priority == 3
    # a's two jobs and b's are queued; the capped one left nothing behind.
    assert len(await drain(store)) == 3


async def test_claiming_several_at_once_serves_vendors_as_claiming_one_by_one(
    redis_server: Callable[..., RedisServer],
) -> None:
    """A node with free slots claims up to 16 jobs in one round trip (issue 20): the
    fair order must be exactly the one-by-one order, each job leased once."""
    client = aioredis.from_url(redis_server().url)
    one, many = (
        Store(client, Keys(prefix), Retention(), RetryPolicy()) for prefix in ("one:", "many:")
    )
    try:
        for store in (one, many):
            for i in range(30):  # a floods with large photos, b and c trickle in
                await enqueue(store, "a", pixels=3_000_000)
                if i % 3 == 0:
                    await enqueue(store, "b", pixels=500_000)
                if i % 5 == 0:
                    await enqueue(store, "c", priority=5, pixels=1_000_000)
        singly = [(c.vendor, c.attempt) for c in await drain(one)]
        together: list[Claim] = []
        while got := await many.claims.claim_many("node", 10_000, "", 7):
            assert len(got) <= 7
            together += got
        assert [(c.vendor, c.attempt) for c in together] == singly
        assert len(together) == 30 + 10 + 6
        assert len({c.job_id for c in together}) == len(together)  # none leased twice
        assert all(c.image == b"image-bytes" for c in together)
        last = together[-1]
        job = await many.jobs.get(last.vendor, last.job_id)
        assert job.state == jobs_pb2.JOB_STATE_RUNNING
        assert await many.claims.claim_many("node", 10_000, "", 7) == []
    finally:
        await client.aclose()


async def test_an_attempt_cancelled_before_it_ran_gives_its_slot_and_credit_back(
    store: Store, tmp_path: Path
) -> None:
    """A drain or a silent node can cancel an attempt's task before its first step; its
    body (and so its cleanup) then never runs. The node's slot and the Work stream's
    credit must still come back, and the job go back to its queue at once, uncounted."""
    pool = NodePool(["127.0.0.1:9"], 0.1, 1 << 20, InternalToken(new_token()))
    node = pool.nodes[0]
    node.healthy, node.capacity = True, 4
    link = WorkLink(node.address, node.stub, (), lambda: None)
    # The node's first message opens the stream: 4 slots (as WorkLink reads it, no network).
    link._received(pb.WorkResponse(credit=pb.WorkCredit(jobs=4)), asyncio.Queue())
    node.work = link
    policy = DispatchPolicy(
        lease_ms=15_000, attempt_timeout_s=60, attempt_timeout_floor_s=15,
        attempt_timeout_factor=5, node_silent_s=5, reap_interval_s=0.25, progress_interval_s=0.2,
    )  # fmt: skip
    dispatcher = Dispatcher(store, pool, ResultStores(LocalResultStore(tmp_path)), policy)
    job_id = await enqueue(store, "a")
    (claim,) = await store.claims.claim_many(node.address, 10_000, "", 4)
    attempt = dispatcher.start(claim, node, light=False)
    assert (node.free, link.room(False)) == (3, 3)
    attempt.abandon("the scheduler running it stopped", Charge.FREE)
    await dispatcher.drain(grace_s=1.0)
    assert (node.local_in_flight, node.free, link.room(False)) == (0, 4, 4)
    job = await store.jobs.get("a", job_id)
    assert job.state == jobs_pb2.JOB_STATE_QUEUED
    assert job.attempt == 0  # not counted: the node never saw it
    await pool.close()


async def test_one_call_renews_every_held_lease_and_names_the_attempts_that_lost_theirs(
    store: Store,
) -> None:
    """A scheduler renews all its leases together (issue 20); a renewal must never
    revive a cancelled job's lease, nor an older attempt's."""
    kept, cancelled, stale = [await enqueue(store, "a") for _ in range(3)]
    claims = {c.job_id: c for c in await store.claims.claim_many("node", 200, "", 3)}
    await store.cancellation.cancel("a", cancelled)
    assert await store.attempts.reap() == []
    await asyncio.sleep(0.25)  # past every lease: the next reap would take all three
    old = claims[stale]
    assert await store.attempts.retry(old, status_from_code(grpc.StatusCode.UNAVAILABLE, "x"))
    newer = await claim_after_backoff(store, lease_ms=200)
    assert newer is not None and (newer.job_id, newer.attempt) == (stale, 2)
    lost = await store.attempts.renew_many([*claims.values(), newer], 10_000)
    assert sorted(lost) == sorted([cancelled, stale])  # the stale one: its attempt 1
    assert await store.attempts.reap() == []  # kept's and the newer attempt's leases renewed
    job = await store.jobs.get("a", kept)
    assert job.state == jobs_pb2.JOB_STATE_RUNNING and job.attempt == 1


async def test_completions_skip_script_exists_and_survive_redis_losing_its_scripts(
    store: Store,
) -> None:
    """complete_many sends its scripts by hash with no SCRIPT EXISTS round trip first;
    after Redis lost them (a restart, SCRIPT FLUSH), it loads them and still records."""

    async def script_exists_calls() -> int:
        stats = await store.redis.info("commandstats")
        return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))

    ids = [await enqueue(store, "a") for _ in range(3)]
    claims = await store.claims.claim_many("node", 10_000, "", 3)
    result = jobs_pb2.Result(content_type="image/png", uri="local:a/x.png")
    before = await script_exists_calls()
    done = [Completion(claims[0], result, False, [(jobs_pb2.STAGE_ENCODING, 90)], 10_000)]
    assert await store.attempts.complete_many(done) == [True]
    assert await script_exists_calls() == before
    await store.redis.script_flush()
    rest = [
        Completion(c, result, False, [(jobs_pb2.STAGE_ENCODING, 90)], 10_000) for c in claims[1:]
    ]
    assert await store.attempts.complete_many(rest) == [True, True]
    for job_id in ids:
        job = await store.jobs.get("a", job_id)
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED and job.result.uri == "local:a/x.png"
