"""A node past its RSS limit rebuilds its model sessions, loses no job, and says so."""

from __future__ import annotations

import json
from pathlib import Path

import grpc

from cutout import AsyncClient
from cutout.v1 import jobs_pb2
from services.common.internal_auth import InternalToken
from services.internal.v1 import inference_service_pb2 as pb
from services.internal.v1 import inference_service_pb2_grpc as pb_grpc
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS
from tests.support.waiting import until

MB = 2**20


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
    await until(
        lambda: "model sessions recycled" in node.log_path.read_text(), "the node logged it"
    )
    lines = [json.loads(line) for line in node.log_path.read_text().splitlines() if line.strip()]
    recycled = [line for line in lines if line.get("msg") == "model sessions recycled"]
    assert recycled and recycled[0]["rss_after_mb"] > 0
