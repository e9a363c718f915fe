"""The scheduler's promises at scale, on real processes and a real redis-server.

- 200 jobs while nodes are SIGKILLed every couple of seconds: none lost.
- Two schedulers on one Redis, 1,000 jobs, one scheduler SIGKILLed midway:
  each job succeeds once as the vendor sees it; a job executes twice only
  after a lease loss, and those are counted.
- Nodes found through DNS; outputs deleted when their jobs expire.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from cutout import AsyncClient
from cutout.client import build_submission
from cutout.v1 import jobs_pb2
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS

A = KEYS["vendor-a"]


def photo_jpeg(side: int) -> bytes:
    """A real photo scaled up: enough decode/encode work that a kill lands mid-job."""
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def submit_all(client: AsyncClient, image: bytes, count: int) -> list[str]:
    """In batches of up to 1000 that fit the gateway's request limit (20 MiB of images)."""
    names: list[str] = []
    per_batch = max(1, min(1000, (20 << 20) // (len(image) + 64)))
    for start in range(0, count, per_batch):
        reply = await client.submit_batch(
            [build_submission(image) for _ in range(min(per_batch, count - start))]
        )
        assert all(o.HasField("job") for o in reply.outcomes), reply
        names += [o.job.name for o in reply.outcomes]
    return names


async def wait_idle(client: AsyncClient, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        stats = await client.stats()
        if stats.queued == 0 and stats.running == 0:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"still busy after {timeout_s}s: {await client.stats()}")


async def states(client: AsyncClient) -> collections.Counter[int]:
    counts: collections.Counter[int] = collections.Counter()
    token = ""
    while True:
        page = await client.list_jobs(page_size=500, page_token=token)
        counts.update(job.state for job in page.jobs)
        token = page.next_page_token
        if not token:
            return counts


def executions(cluster: LocalCluster) -> collections.Counter[str]:
    """How many times each job was started on a node, from the nodes' own logs."""
    runs: collections.Counter[str] = collections.Counter()
    for node in cluster.nodes:
        for line in node.log_path.read_text().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("msg") == "processing":
                    runs[entry["job_id"]] += 1
    return runs


async def test_no_job_is_lost_while_nodes_are_killed_every_few_seconds(
    make_cluster, tiny_model_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(
        tiny_model_dir,
        nodes=3,
        CUTOUT_NODE_CAPACITY="2",
        CUTOUT_RETRY_BASE_MS="100",
        CUTOUT_MAX_RETRIES="20",
        CUTOUT_LOG_LEVEL="WARNING",
    )
    rng = random.Random(7)
    kills = 0
    async with AsyncClient(cluster.gateway_address, A, timeout_s=60) as client:
        names = await submit_all(client, photo_jpeg(1200), 200)

        async def chaos() -> None:
            nonlocal kills
            while True:
                await asyncio.sleep(2.0)
                index = rng.randrange(len(cluster.nodes))
                cluster.kill(cluster.nodes[index])
                kills += 1
                await asyncio.sleep(0.3)
                await asyncio.to_thread(cluster.start_node, index)

        killer = asyncio.create_task(chaos())
        try:
            await wait_idle(client, timeout_s=400)
        finally:
            killer.cancel()
        counts = await states(client)
        stats = await client.stats()
        for name in rng.sample(names, 5):
            _, data = await client.result(name)
            assert Image.open(io.BytesIO(data)).size == (1200, 1200)
    assert kills >= 3, "the run ended before the chaos did anything"
    assert counts == {jobs_pb2.JOB_STATE_SUCCEEDED: 200}, counts
    assert stats.succeeded == 200 and stats.dead_lettered == 0
    # Kills landed on running jobs, which were retried, not lost.
    assert stats.retries + stats.lease_losses > 0, stats


async def test_two_schedulers_1000_jobs_each_succeeds_once(
    make_cluster, tiny_model_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(
        tiny_model_dir,
        nodes=2,
        CUTOUT_NODE_CAPACITY="4",
        CUTOUT_LEASE_MS="2000",
        CUTOUT_RETRY_BASE_MS="100",
    )
    second = await asyncio.to_thread(cluster.add_scheduler)
    async with AsyncClient(cluster.gateway_address, A, timeout_s=60) as client:
        names = await submit_all(client, photo_jpeg(96), 1000)
        # One replica dies mid-run: the jobs it had leased come back to the other.
        while (await client.stats()).succeeded < 300:
            await asyncio.sleep(0.1)
        cluster.kill(second)
        await wait_idle(client, timeout_s=300)
        counts = await states(client)
        stats = await client.stats()
        seen = [await client.get(n) for n in random.Random(1).sample(names, 20)]
    assert counts == {jobs_pb2.JOB_STATE_SUCCEEDED: 1000}, counts
    assert all(j.state == jobs_pb2.JOB_STATE_SUCCEEDED and j.result.sha256 for j in seen)
    runs = executions(cluster)
    assert set(runs) == {n.removeprefix("jobs/") for n in names}
    duplicates = sum(n - 1 for n in runs.values())
    # Both replicas dispatched; nothing ran twice except after a lost lease.
    assert "attempt started" in second.log_path.read_text()  # both replicas dispatched
    assert duplicates <= stats.lease_losses, (duplicates, stats)
    # A claim the dying replica made but never sent is an attempt without an execution.
    assert stats.succeeded == 1000
    assert 1000 + duplicates == sum(runs.values()) <= stats.attempts_started


async def test_nodes_found_through_dns(
    make_cluster, tiny_model_dir: Path, photos: dict[str, bytes]
) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(tiny_model_dir, nodes=1, dns_nodes=True)
    assert cluster.scheduler is not None
    assert cluster.scheduler.env["CUTOUT_NODES"].startswith("dns:///localhost:")
    async with AsyncClient(cluster.gateway_address, A) as client:
        job = await client.submit(photos["coffee"])
        async for event in client.watch(job.name):
            final = event.job
        assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final.error.message
        assert final.node == cluster.nodes[0].address


async def test_outputs_are_deleted_when_their_jobs_expire(
    make_cluster, tiny_model_dir: Path, photos: dict[str, bytes]
) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(tiny_model_dir, nodes=1, CUTOUT_RETENTION_S="2")
    async with AsyncClient(cluster.gateway_address, A) as client:
        job = await client.submit(photos["coffee"])
        async for event in client.watch(job.name):
            final = event.job
        assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED
        stored = cluster.workdir / "results" / final.result.uri.removeprefix("local:")
        assert stored.is_file()
        alpha = np.asarray(Image.open(stored).getchannel("A"))
        assert alpha.shape == (400, 600)
        for _ in range(40):
            if not stored.exists():
                break
            await asyncio.sleep(0.25)
        assert not stored.exists(), "the output outlived its job"
        assert (await client.list_jobs()).jobs == []
