"""The Cloudinary result store in a cluster: uploads retried, records pointed at Cloudinary,
late watchers shown the uploaded URL (the real `cloudinary` SDK against a local stand-in)."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from pathlib import Path

import grpc
import pytest

from cutout import AsyncClient, CutoutError
from cutout.v1 import jobs_pb2
from services.scheduler.migrate import migrate
from services.scheduler.records import MysqlTarget
from tests.support.cloudinary_standin import CloudinaryStandIn
from tests.support.cluster import KEYS
from tests.support.mariadb import SHARED, rows


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
