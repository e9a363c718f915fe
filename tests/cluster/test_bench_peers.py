"""The benchmarks' own tools, for correctness only (no timing is asserted):

- bench/fixed_node.py behind one real scheduler: every job succeeds with the
  node's PNG, and the node never has more jobs in its slots than it advertises;
- bench/peers.py: arq and Celery workers each complete 5 jobs with a real PNG.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from cutout import AsyncClient
from cutout.client import build_submission
from cutout.v1 import jobs_pb2
from services.local.cluster import ClusterConfig
from services.local.redis import RedisServer
from tests.support.cluster import KEYS

ROOT = Path(__file__).resolve().parents[2]  # the checkout: bench/ is imported from it
sys.path.insert(0, str(ROOT))

from bench import peers  # noqa: E402
from bench.fixed_node import tiny_png  # noqa: E402
from bench.scale import FixedNodeCluster  # noqa: E402


async def test_fixed_node_behind_a_real_scheduler(tiny_model_dir: Path, tmp_path: Path) -> None:
    stats = tmp_path / "fixed-node.json"
    cluster = FixedNodeCluster(
        ClusterConfig(
            nodes=1,
            gateway_port=0,
            workdir=tmp_path / "cluster",
            model_dir=tiny_model_dir,
            api_keys=dict(KEYS),
            extra_env={
                "CUTOUT_NODE_POLL_S": "0.2",
                "CUTOUT_NODE_CAPACITY": "2",
                "CUTOUT_FIXED_STATS": str(stats),
            },
        ),
        service_ms=20,
    )
    cluster.start()
    try:
        async with AsyncClient(cluster.gateway_address, KEYS["vendor-a"]) as client:
            image = peers.small_jpeg()
            reply = await client.submit_batch([build_submission(image) for _ in range(12)])
            names = [o.job.name for o in reply.outcomes if o.HasField("job")]
            assert len(names) == 12
            for name in names:
                async for event in client.watch(name):
                    if event.job.done:
                        assert event.job.state == jobs_pb2.JOB_STATE_SUCCEEDED
                        break
                result, data = await client.result(name)
                assert result.content_type == "image/png"
                assert data == tiny_png()
        node = cluster.nodes[0]
        cluster.terminate(node)  # SIGTERM: the node writes its counters
        counters = json.loads(stats.read_text())
    finally:
        cluster.stop()
    assert counters["slots"] == 2
    assert counters["completed"] == 12
    assert 1 <= counters["max_in_flight"] <= 2


@pytest.mark.parametrize("kind", ["arq", "celery"])
async def test_peer_completes_five_jobs(kind: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        url = f"redis://127.0.0.1:{redis.port}/1"
        run = peers.arq_jobs if kind == "arq" else peers.celery_jobs
        with peers.Workers(kind, url, tiny_model_dir, tmp_path / "work", procs=1):
            times = await asyncio.wait_for(run(url, peers.small_jpeg(), 5), 60)
    finally:
        redis.stop()
    assert len(times) == 5  # and each result was checked to be a PNG
    assert all(enqueued <= started <= ended for enqueued, started, ended in times)
