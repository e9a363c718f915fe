"""A node past its RSS limit rebuilds its model sessions, loses no job, and says so."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc

from cutout import AsyncClient
from cutout.v1 import jobs_pb2
from services.common.internal_auth import InternalToken
from services.inference.recycling import RecyclePolicy, rss_bytes
from services.internal.v1 import inference_service_pb2 as pb
from services.internal.v1 import inference_service_pb2_grpc as pb_grpc
from services.local.cluster import LocalCluster
from tests.conftest import KEYS

MB = 2**20


def test_policy_recycles_past_the_limit_and_does_not_thrash() -> None:
    policy = RecyclePolicy(500 * MB)
    assert not policy.due(400 * MB)
    assert policy.due(600 * MB)
    policy.recycled(600 * MB, 550 * MB)  # could not get under the limit
    assert not policy.due(600 * MB)  # not again until it really grows
    assert policy.due(700 * MB)
    policy.recycled(700 * MB, 300 * MB)
    assert not policy.due(450 * MB) and policy.due(520 * MB)
    assert policy.recycles == 2
    assert not RecyclePolicy(0).due(10**12)  # 0 = off


def test_rss_is_this_process_resident_memory() -> None:
    before = rss_bytes()
    block = bytearray(64 * MB)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    assert rss_bytes() - before >= 48 * MB
    del block


async def test_node_recycles_its_sessions_and_every_job_succeeds(
    make_cluster,
    tiny_model_dir: Path,
    photos: dict[str, bytes],  # type: ignore[no-untyped-def]
) -> None:
    cluster: LocalCluster = make_cluster(tiny_model_dir, nodes=1, CUTOUT_MAX_RSS_MB="1")
    async with AsyncClient(cluster.gateway_address, KEYS["vendor-a"]) as client:
        jobs = [await client.submit(photos["coffee"]) for _ in range(12)]
        for job in jobs:
            async for event in client.watch(job.name):
                last = event.job
            assert last.state == jobs_pb2.JOB_STATE_SUCCEEDED, last
    node = cluster.nodes[0]
    async with grpc.aio.insecure_channel(node.address) as channel:
        token = InternalToken(cluster.config.internal_token)
        load = await pb_grpc.InferenceServiceStub(channel).GetLoad(
            pb.GetLoadRequest(), metadata=token.metadata()
        )
    assert load.recycles >= 1
    assert load.rss_bytes > 10 * MB
    assert load.models[0].execution_provider == "CPUExecutionProvider"  # reloaded, still serving
    await asyncio.sleep(0.2)
    lines = [json.loads(line) for line in node.log_path.read_text().splitlines() if line.strip()]
    recycled = [line for line in lines if line.get("msg") == "model sessions recycled"]
    assert recycled and recycled[0]["rss_after_mb"] > 0
