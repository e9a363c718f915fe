"""The Cloudinary result store and the outbox on a real redis-server: two deliverers of one
job agree on one uploaded URI."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis
from PIL import Image

from cutout.v1 import jobs_pb2
from services.local.redis import RedisServer
from services.scheduler.cloudinary_store import (
    CloudinaryAccount,
    CloudinaryResultStore,
    public_id_from_url,
)
from services.scheduler.delivery import Deliverer
from services.scheduler.keys import Keys
from services.scheduler.storage import LocalResultStore, ResultStores
from services.scheduler.store import Store
from tests.support.cloudinary_standin import CloudinaryStandIn


def png(color: tuple[int, int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (8, 8), color).save(out, "PNG")
    return out.getvalue()


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
