"""Crashes cost a repeated inference, never a job: real processes, real model, SIGKILL."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from cutout import AsyncClient
from cutout.v1 import jobs_pb2
from services.local.cluster import ClusterConfig, LocalCluster
from tests.support.cluster import KEYS, final_state

A = KEYS["vendor-a"]


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, real_model_dir: Path
) -> Iterator[LocalCluster]:
    cluster = LocalCluster(
        ClusterConfig(
            nodes=2,
            gateway_port=0,
            workdir=tmp_path_factory.mktemp("faults"),
            model_dir=real_model_dir,
            api_keys=dict(KEYS),
            # Short leases so a dead scheduler's job comes back within seconds.
            extra_env={"CUTOUT_NODE_POLL_S": "0.2", "CUTOUT_LEASE_MS": "3000"},
        )
    )
    cluster.start()
    yield cluster
    cluster.stop()


async def wait_running(client: AsyncClient, name: str) -> jobs_pb2.Job:
    async for event in client.watch(name):
        if (
            event.job.state == jobs_pb2.JOB_STATE_RUNNING
            and event.job.stage >= jobs_pb2.STAGE_INFERENCE
        ):
            return event.job
    raise AssertionError("job finished before it could be interrupted")


async def test_node_killed_mid_job_job_finishes_on_another(
    cluster: LocalCluster, photos: dict[str, bytes]
) -> None:
    async with AsyncClient(cluster.gateway_address, A) as client:
        job = await client.submit(photos["astronaut"])
        running = await asyncio.wait_for(wait_running(client, job.name), 120)
        victim = next(n for n in cluster.nodes if n.address == running.node)
        cluster.kill(victim)
        done = await final_state(client, job.name)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error.message
        assert done.node != victim.address
        assert done.attempt == 2
        _, data = await client.result(job.name)
    assert Image.open(io.BytesIO(data)).size == (512, 512)


async def test_scheduler_killed_mid_job_job_still_finishes(
    cluster: LocalCluster, photos: dict[str, bytes]
) -> None:
    async with AsyncClient(cluster.gateway_address, A) as client:
        job = await client.submit(photos["chelsea"])
        queued_behind = await client.submit(photos["coffee"])
        await asyncio.wait_for(wait_running(client, job.name), 120)
        assert cluster.scheduler is not None
        cluster.kill(cluster.scheduler)
        await asyncio.to_thread(cluster.start_scheduler)
        done = await final_state(client, job.name)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error.message
        assert done.attempt >= 2  # the lease of the dead scheduler's attempt expired
        other = await final_state(client, queued_behind.name)
        assert other.state == jobs_pb2.JOB_STATE_SUCCEEDED, other.error.message


async def test_redis_killed_and_restarted_keeps_every_queued_job(
    make_cluster, tiny_model_dir: Path, photos: dict[str, bytes]
) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(tiny_model_dir, nodes=1, start=False)
    cluster.start(start_nodes=False)  # nothing can run: every job stays queued
    async with AsyncClient(cluster.gateway_address, A) as client:
        names = [(await client.submit(photos["coffee"])).name for _ in range(20)]
        assert cluster.redis is not None
        await asyncio.sleep(1.2)  # appendfsync everysec: let the second pass
        await asyncio.to_thread(cluster.redis.kill)  # SIGKILL, no clean shutdown
        await asyncio.sleep(1.0)  # the scheduler polls a Redis that is not there
        await asyncio.to_thread(cluster.redis.start)  # replays the AOF
        queued = [await client.get(n) for n in names]
        assert [j.state for j in queued] == [jobs_pb2.JOB_STATE_QUEUED] * 20
        assert sorted(j.queue_position for j in queued) == list(range(1, 21))
        await asyncio.to_thread(cluster.start_node, 0)
        for name in names:
            done = await final_state(client, name, timeout_s=60)
            assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error.message
        _, data = await client.result(names[0])
        assert Image.open(io.BytesIO(data)).mode == "RGBA"
