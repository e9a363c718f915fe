"""The Cloudinary result store: the real `cloudinary` SDK against a local stand-in."""

from __future__ import annotations

import asyncio
import hashlib
import io
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from PIL import Image

from cutout import AsyncClient, CutoutError
from cutout.v1 import jobs_pb2
from services.local.redis import RedisServer
from services.scheduler.cloudinary_store import (
    CloudinaryAccount,
    CloudinaryResultStore,
    public_id_from_url,
)
from services.scheduler.delivery import Deliverer
from services.scheduler.keys import Keys
from services.scheduler.migrate import migrate
from services.scheduler.records import MysqlTarget
from services.scheduler.storage import LocalResultStore, ResultStores, StorageError
from services.scheduler.store import Store
from tests.cloudinary_standin import CloudinaryStandIn
from tests.conftest import KEYS
from tests.test_records import SHARED, rows


@pytest.fixture
def standin() -> Iterator[CloudinaryStandIn]:
    server = CloudinaryStandIn().start()
    yield server
    server.stop()


def png(color: tuple[int, int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (8, 8), color).save(out, "PNG")
    return out.getvalue()


async def test_signed_upload_lands_in_vendor_project_folder(standin: CloudinaryStandIn) -> None:
    store = CloudinaryResultStore(CloudinaryAccount.from_url(standin.url))
    job_id = uuid.uuid4().hex
    data = png((255, 0, 0, 255))
    url = await store.put(f"vendor-a/{job_id}.png", data, "image/png", folder="proj-7")

    # The stand-in accepted it only because the signature, key and timestamp checked out.
    [req] = standin.requests
    assert req.status == 200 and req.params["signature"]
    assert req.params["public_id"] == job_id and req.params["folder"] == "vendor-a/proj-7"
    asset = standin.assets[f"vendor-a/proj-7/{job_id}"]
    assert hashlib.sha256(asset.data).digest() == hashlib.sha256(data).digest()
    assert (
        url
        == f"https://res.cloudinary.com/cutout-test/image/upload/v1/vendor-a/proj-7/{job_id}.png"
    )
    assert public_id_from_url(url) == f"vendor-a/proj-7/{job_id}"


async def test_a_retried_upload_overwrites_instead_of_duplicating(
    standin: CloudinaryStandIn,
) -> None:
    store = CloudinaryResultStore(CloudinaryAccount.from_url(standin.url))
    job_id = uuid.uuid4().hex
    await store.put(f"vendor-a/{job_id}.png", png((1, 2, 3, 255)), "image/png", folder="p")
    second = png((9, 9, 9, 255))
    url = await store.put(f"vendor-a/{job_id}.png", second, "image/png", folder="p")
    assert list(standin.assets) == [f"vendor-a/p/{job_id}"]
    assert standin.assets[f"vendor-a/p/{job_id}"].data == second
    assert "/v2/" in url

    await store.delete(url)
    assert standin.assets == {}
    assert standin.requests[-1].action == "destroy" and standin.requests[-1].status == 200


async def test_a_wrong_secret_or_failing_service_is_a_storage_error(
    standin: CloudinaryStandIn,
) -> None:
    bad = CloudinaryAccount.from_url(standin.url.replace(standin.api_secret, "wrong"))
    with pytest.raises(StorageError, match="Invalid Signature"):
        await CloudinaryResultStore(bad).put(
            f"v/{uuid.uuid4().hex}.png", png((0,) * 4), "image/png"
        )

    standin.fail_next = 1
    good = CloudinaryResultStore(CloudinaryAccount.from_url(standin.url))
    with pytest.raises(StorageError, match="General Error"):
        await good.put(f"v/{uuid.uuid4().hex}.png", png((0,) * 4), "image/png")
    assert standin.assets == {}


def test_cloudinary_url_errors_never_echo_the_secret() -> None:
    for url in ("https://k:s3cret@cloud", "cloudinary://cloud", "cloudinary://k@cloud"):
        with pytest.raises(ValueError) as err:
            CloudinaryAccount.from_url(url)
        assert "s3cret" not in str(err.value)
    account = CloudinaryAccount.from_url("cloudinary://k:s3cret@cloud")
    assert "s3cret" not in repr(account)


async def test_cluster_uploads_retries_failures_and_points_records_at_cloudinary(
    make_cluster,
    tiny_model_dir: Path,
    photos: dict[str, bytes],
    standin: CloudinaryStandIn,  # type: ignore[no-untyped-def]
) -> None:
    await migrate(MysqlTarget.from_url(SHARED))
    standin.fail_next = 4  # the first uploads fail: outputs wait locally, then go up
    cluster = make_cluster(
        tiny_model_dir,
        CUTOUT_STORAGE="cloudinary",
        CLOUDINARY_URL=standin.url,
        CUTOUT_MYSQL_URL=SHARED,
        CUTOUT_DELIVERY_RETRY_MS="200",
    )
    records = [f"r-{uuid.uuid4().hex[:12]}" for _ in range(3)]
    async with AsyncClient(cluster.gateway_address, KEYS["vendor-a"]) as client:
        names = [
            (await client.submit(photos["coffee_small"], record=("shop-1", r))).name
            for r in records
        ]
        deadline = time.monotonic() + 60
        while True:
            jobs = [await client.get(n) for n in names]
            if all(j.result.uri.startswith("https://") for j in jobs):
                break
            assert time.monotonic() < deadline, [j.result.uri for j in jobs]
            await asyncio.sleep(0.2)
        with pytest.raises(CutoutError) as err:
            await client.result(names[0])

    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert jobs[0].result.uri in str(err.value)
    assert sum(r.status == 500 for r in standin.requests) == 4  # the failures happened...
    for job in jobs:  # ...and every result still landed, once, in the right place
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED
        job_id = job.name.removeprefix("jobs/")
        asset = standin.assets[f"vendor-a/shop-1/{job_id}"]
        assert hashlib.sha256(asset.data).hexdigest() == job.result.sha256
        assert job.result.uri.endswith(f"/vendor-a/shop-1/{job_id}.png")
    assert len(standin.assets) == 3
    # Nothing left behind in the local store once uploaded.
    assert not list((cluster.workdir / "results").rglob("*.png"))
    # The vendor's records point at the Cloudinary URLs.
    deadline = time.monotonic() + 30
    while True:
        found = rows(SHARED, "vendor-a")
        if all(r in found for r in records) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    by_id = {j.name.removeprefix("jobs/"): j.result.uri for j in jobs}
    for r in records:
        url, status, job_id, _ = found[r]
        assert (url, status) == (by_id[job_id], "completed")


async def test_a_late_watcher_replays_the_uploaded_url_not_the_local_copy(
    make_cluster,
    tiny_model_dir: Path,
    photos: dict[str, bytes],
    standin: CloudinaryStandIn,  # type: ignore[no-untyped-def]
) -> None:
    """WatchJob and GetJob agree on where a delayed upload put the output."""
    standin.fail_next = 1  # the inline upload fails: the output waits locally, then goes up
    cluster = make_cluster(
        tiny_model_dir,
        CUTOUT_STORAGE="cloudinary",
        CLOUDINARY_URL=standin.url,
        CUTOUT_DELIVERY_RETRY_MS="200",
    )
    async with AsyncClient(cluster.gateway_address, KEYS["vendor-a"]) as client:
        name = (await client.submit(photos["coffee_small"])).name
        deadline = time.monotonic() + 60
        while not (got := await client.get(name)).result.uri.startswith("https://"):
            assert time.monotonic() < deadline, got.result.uri
            await asyncio.sleep(0.2)
        events = [event.job async for event in client.watch(name)]

    assert sum(r.status == 500 for r in standin.requests) == 1  # it did wait locally first
    succeeded = [j for j in events if j.state == jobs_pb2.JOB_STATE_SUCCEEDED]
    assert succeeded[0].result.uri.startswith("local:")  # what watchers saw at the time...
    assert events[-1].result.uri == got.result.uri  # ...and, replayed now, where it went
    assert events[-1].update_time == got.update_time


async def until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_two_deliverers_of_one_job_agree_on_one_uploaded_uri(
    redis_server: Callable[..., RedisServer], standin: CloudinaryStandIn, tmp_path: Path
) -> None:
    """A delivery lease runs out mid-upload, so a second deliverer uploads the same output.

    Both uploads go to the job's one public id (overwrite), so there is one asset
    either way; the result switches exactly once, and the job, its events and the
    retention set all name the same URI. Nothing is left in the local store.
    """
    redis = aioredis.from_url(redis_server().url)
    keys = Keys("race:")
    store = Store(redis, keys, delivery_lease_ms=100)  # shorter than the held upload
    local = LocalResultStore(tmp_path / "results")
    remote = CloudinaryResultStore(CloudinaryAccount.from_url(standin.url))
    stores = ResultStores(local, remote, "cloudinary")
    # A job that succeeded while Cloudinary was down: its output waits locally.
    sub = jobs_pb2.JobSubmission()
    sub.operation.remove_background.model = "tiny"
    job, _ = await store.submissions.enqueue("vendor-a", sub, b"input", 64)
    job_id = job.name.removeprefix("jobs/")
    claim = await store.claims.claim("node", 10_000)
    assert claim is not None
    data = png((0, 128, 255, 255))
    local_uri = await local.put(f"vendor-a/{job_id}.png", data, "image/png")
    result = jobs_pb2.Result(uri=local_uri, content_type="image/png", size_bytes=len(data))
    assert await store.attempts.complete(claim, result, deliver=True)

    standin.hold = threading.Event()
    first = Deliverer(store.outbox, store.blobs, stores, writer=None)
    second = Deliverer(store.outbox, store.blobs, stores, writer=None)

    async def when_due(deliverer: Deliverer) -> int:
        while not (got := await deliverer.deliver_once()):
            await asyncio.sleep(0.02)
        return got

    one = asyncio.create_task(first.deliver_once())
    await until(lambda: standin.held == 1)
    two = asyncio.create_task(when_due(second))  # once the first one's lease has run out
    await until(lambda: standin.held == 2)
    standin.hold.set()
    assert await asyncio.wait_for(asyncio.gather(one, two), 30) == [1, 1]

    final = (await store.jobs.get("vendor-a", job_id)).result.uri
    assert final.startswith("https://")
    # Exactly one switch: one event after SUCCEEDED, carrying the final result.
    events = await redis.xrange(keys.events(job_id))
    switches = [f for _, f in events if b"result" in f and b"state" not in f]
    assert [jobs_pb2.Result.FromString(f[b"result"]).uri for f in switches] == [final]
    watched = [j async for j in store.jobs.watch("vendor-a", job_id)]
    assert watched[-1].result.uri == final
    # Retention follows the final URI; the local copy is deleted and forgotten.
    kept = [uri.decode() for uri in await redis.zrange(keys.blobs, 0, -1)]
    assert kept == [final]
    assert not (tmp_path / "results" / "vendor-a" / f"{job_id}.png").exists()
    # One asset, the one the final URI names; both uploads landed on it.
    assert [a for a in standin.assets] == [f"vendor-a/{job_id}"]
    assert public_id_from_url(final) == f"vendor-a/{job_id}"
    assert sum(r.action == "upload" and r.status == 200 for r in standin.requests) == 2
    assert await store.outbox.pending() == 0
    await redis.aclose()
