"""A job whose every attempt times out ends in the dead-letter queue, visible and
manageable through the gateway and `cutout dlq`; nothing is lost on the way."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cutout import AsyncClient
from cutout.v1 import jobs_pb2
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS

A = KEYS["vendor-a"]


def huge_smooth_jpeg(side: int = 6000) -> bytes:
    """36 megapixels that compress to little: decoding, resizing and encoding
    it takes well over the 1 s attempt deadline this test sets."""
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    img = np.stack(
        [
            np.tile(ramp, (side, 1)),
            np.tile(ramp[:, None], (1, side)),
            np.full((side, side), 90, np.uint8),
        ],
        -1,
    )
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=80)
    return buf.getvalue()


async def until_done(client: AsyncClient, name: str) -> jobs_pb2.Job:
    job = jobs_pb2.Job()
    async for event in client.watch(name):
        job = event.job
    return job


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cutout.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_timed_out_job_is_dead_lettered_then_requeued_and_purged(
    make_cluster, tiny_model_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(
        tiny_model_dir,
        nodes=1,
        CUTOUT_ATTEMPT_TIMEOUT_S="1",
        CUTOUT_MAX_RETRIES="1",
        CUTOUT_RETRY_BASE_MS="200",
    )
    env = {**os.environ, "CUTOUT_ADDR": cluster.gateway_address, "CUTOUT_API_KEY": A}
    async with AsyncClient(cluster.gateway_address, A) as client:
        job = await client.submit(await asyncio.to_thread(huge_smooth_jpeg))
        dead = await asyncio.wait_for(until_done(client, job.name), 120)
        assert dead.state == jobs_pb2.JOB_STATE_FAILED and dead.dead_lettered
        assert dead.attempt == 2  # the first attempt and one retry
        assert dead.error.code == 4  # DEADLINE_EXCEEDED, the last error

        listed = cli(env, "dlq", "list")
        assert listed.returncode == 0 and job.name in listed.stdout, listed.stderr
        assert job.name in {j.name for j in (await client.dead_letters()).jobs}

        requeued = cli(env, "dlq", "requeue", job.name)
        assert requeued.returncode == 0 and "queued" in requeued.stdout, requeued.stderr
        again = await asyncio.wait_for(until_done(client, job.name), 120)
        assert again.dead_lettered  # still too slow: back in the dead-letter queue

        purged = cli(env, "dlq", "purge", "--all")
        assert purged.returncode == 0 and "purged 1" in purged.stdout, purged.stderr
        assert (await client.dead_letters()).jobs == []
        final = await client.get(job.name)
        assert final.state == jobs_pb2.JOB_STATE_FAILED and not final.dead_lettered

    # Another vendor sees none of it.
    async with AsyncClient(cluster.gateway_address, KEYS["vendor-b"]) as other:
        assert (await other.dead_letters()).jobs == []
