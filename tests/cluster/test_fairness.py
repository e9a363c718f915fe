"""A flood from one vendor does not hold another back: real processes, tiny model."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
from PIL import Image

from cutout import AsyncClient
from cutout.client import build_submission
from cutout.v1 import jobs_pb2
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS
from tests.support.waiting import until


def megapixel_jpeg(seed: int) -> bytes:
    """1000x1000 (1 MP: one turn's credit), smooth so it stays a few KB."""
    ramp = np.linspace(0, 255, 1000, dtype=np.uint8)
    img = np.stack(
        [
            np.tile(ramp, (1000, 1)),
            np.tile(ramp[:, None], (1, 1000)),
            np.full((1000, 1000), seed % 256, np.uint8),
        ],
        -1,
    )
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=70)
    return buf.getvalue()


async def done(client: AsyncClient, name: str) -> jobs_pb2.Job:
    job = jobs_pb2.Job()
    async for event in client.watch(name):
        job = event.job
    return job


async def test_ten_jobs_are_not_stuck_behind_a_thousand(make_cluster, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(tiny_model_dir, nodes=1)
    image = megapixel_jpeg(1)
    async with (
        AsyncClient(cluster.gateway_address, KEYS["vendor-a"], timeout_s=120) as a,
        AsyncClient(cluster.gateway_address, KEYS["vendor-b"]) as b,
    ):
        flood = await a.submit_batch([build_submission(image) for _ in range(1000)])
        assert all(o.HasField("job") for o in flood.outcomes)
        first = flood.outcomes[0].job.name

        async def flood_served() -> bool:
            return (await a.get(first)).state != jobs_pb2.JOB_STATE_QUEUED

        await until(flood_served, "the node took the flood's first job")
        b_jobs = [await b.submit(megapixel_jpeg(i)) for i in range(10)]
        b_start = min(j.create_time.ToMilliseconds() for j in b_jobs)
        finished = await asyncio.wait_for(asyncio.gather(*(done(b, j.name) for j in b_jobs)), 120)
        assert all(j.state == jobs_pb2.JOB_STATE_SUCCEEDED for j in finished)
        b_end = max(j.update_time.ToMilliseconds() for j in finished)

        # How many of A's jobs finished while B's ten were waiting or running?
        succeeded = await a.list_jobs(state=jobs_pb2.JOB_STATE_SUCCEEDED, page_size=500)
        during = [j for j in succeeded.jobs if b_start <= j.update_time.ToMilliseconds() <= b_end]
        remaining = (await a.stats()).queued
    # Strict alternation would be 10 (one of A's per one of B's); allow the
    # jobs already on the node when B arrived and one claim in flight.
    assert len(during) <= 10 * 2 + 4, f"{len(during)} of A's jobs went while B waited"
    assert remaining > 500, "the flood was mostly still queued: B did not wait for it"
