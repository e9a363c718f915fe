"""Per-vendor quotas at the gateway: exact under bursts, clear refusals, clients that wait.

Real gateway and scheduler processes on a real redis-server; no nodes are
started (admission happens before any inference).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from cutout import AsyncClient, Client, CutoutError
from cutout.client import build_submission
from cutout.v1 import jobs_pb2
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS

A, B = KEYS["vendor-a"], KEYS["vendor-b"]


@pytest.fixture
def limited(make_cluster, tiny_model_dir: Path) -> LocalCluster:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(
        tiny_model_dir,
        start=False,
        rate_limits="remove_background=30/3600,requests=1000/900,batches=1/3600",
    )
    cluster.start(start_nodes=False)
    return cluster


async def test_a_burst_of_200_against_a_limit_of_30_admits_exactly_30(
    limited: LocalCluster, photos: dict[str, bytes]
) -> None:
    async with AsyncClient(limited.gateway_address, A, rate_limit_wait_s=0) as client:
        outcomes = await asyncio.gather(
            *(client.submit(photos["coffee"]) for _ in range(200)), return_exceptions=True
        )
        accepted = [o for o in outcomes if isinstance(o, jobs_pb2.Job)]
        refused = [o for o in outcomes if isinstance(o, CutoutError)]
        assert len(accepted) == 30 and len(refused) == 170
        assert len({j.name for j in accepted}) == 30
        assert (await client.stats()).queued == 30
        err = refused[0]
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "remove_background is limited to 30 per 3600 s" in err.message
        # Spaced evenly: one more fits after 3600/30 = 120 s at most.
        assert err.retry_after_s is not None and 0 < err.retry_after_s <= 120
        assert err.quota_violations == [("vendor:vendor-a", "remove_background: 30 per 3600 s")]
        assert err.trailers["ratelimit-limit"] == "30"
        assert err.trailers["ratelimit-remaining"] == "0"
        assert 0 < int(err.trailers["ratelimit-reset"]) <= 3600
    # Another vendor's quota is its own.
    async with AsyncClient(limited.gateway_address, B, rate_limit_wait_s=0) as other:
        await other.submit(photos["coffee"])


async def test_batch_items_count_one_by_one_and_batches_have_their_own_quota(
    limited: LocalCluster, photos: dict[str, bytes]
) -> None:
    async with AsyncClient(limited.gateway_address, B, rate_limit_wait_s=0) as client:
        items = [build_submission(photos["coffee"]) for _ in range(40)]
        items[3] = build_submission(b"not an image")
        reply = await client.submit_batch(items)
        ok = [o.index for o in reply.outcomes if o.HasField("job")]
        codes = {o.index: o.error.code for o in reply.outcomes if o.HasField("error")}
        # The bad item is refused for itself; of the 39 good ones the first 30 fit the quota.
        assert codes[3] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert ok == [i for i in range(40) if i != 3][:30]
        assert sorted(codes) == [3, *range(31, 40)]
        assert all(codes[i] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] for i in range(31, 40))
        with pytest.raises(CutoutError) as second:  # batches=1/3600
            await client.submit_batch([build_submission(photos["coffee"])])
        assert second.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "batches is limited to 1 per 3600 s" in second.value.message


def test_the_client_waits_as_told_and_retries(
    make_cluster, tiny_model_dir: Path, photos: dict[str, bytes]
) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(
        tiny_model_dir, start=False, rate_limits="remove_background=2/1"
    )
    cluster.start(start_nodes=False)
    with Client(cluster.gateway_address, A, rate_limit_wait_s=0) as impatient:
        impatient.submit(photos["coffee"])
        impatient.submit(photos["coffee"])
        with pytest.raises(CutoutError) as refused:
            impatient.submit(photos["coffee"])
        assert refused.value.retry_after_s is not None
    with Client(cluster.gateway_address, A) as patient:  # waits by default
        jobs = [patient.submit(photos["coffee"]) for _ in range(4)]
    assert len({j.name for j in jobs}) == 4


async def test_queue_caps_shed_load_with_a_clear_error(
    make_cluster, tiny_model_dir: Path, photos: dict[str, bytes]
) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(
        tiny_model_dir, start=False, CUTOUT_MAX_QUEUED_PER_VENDOR="5"
    )
    cluster.start(start_nodes=False)
    async with AsyncClient(cluster.gateway_address, A, rate_limit_wait_s=0) as client:
        for _ in range(5):
            await client.submit(photos["coffee"])
        with pytest.raises(CutoutError) as shed:
            await client.submit(photos["coffee"])
        assert shed.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "vendor-a already has 5 jobs waiting" in shed.value.message
        assert shed.value.retry_after_s == 5.0
        assert (await client.stats()).queued == 5
