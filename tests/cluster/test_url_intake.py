"""Images by URL through a real gateway: allowed hosts fetched, hostile ones refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cutout import AsyncClient, CutoutError
from cutout.client import build_submission
from cutout.v1 import jobs_pb2
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS

A = KEYS["vendor-a"]


def host_port(url: str) -> str:
    return url.removeprefix("http://").split("/")[0]


async def test_gateway_takes_urls_and_refuses_hostile_ones(
    make_cluster, tiny_model_dir: Path, image_server: str
) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(
        tiny_model_dir, CUTOUT_URL_ALLOW_HTTP="1", CUTOUT_URL_ALLOW_HOSTS=host_port(image_server)
    )
    async with AsyncClient(cluster.gateway_address, A) as client:
        job = await client.submit(f"{image_server}/coffee.jpg")
        async for event in client.watch(job.name):
            final = event.job
        assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final.error.message
        assert (final.result.width_px, final.result.height_px) == (600, 400)
        with pytest.raises(CutoutError) as refused:
            await client.submit("http://169.254.169.254/latest/meta-data/")
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.violations[0][0] == "submission.image.uri"
        assert "link-local" in refused.value.message
        # In a batch, the hostile item is refused on its own.
        reply = await client.submit_batch(
            [
                build_submission(f"{image_server}/coffee.jpg"),
                build_submission(f"{image_server}/to-private"),
            ]
        )
        assert reply.outcomes[0].HasField("job")
        assert "10.0.0.1 is private" in reply.outcomes[1].error.message
        # The allow-list opens the image server's port, not its machine: a redirect to the
        # cluster's own Redis on the same address is refused.
        redis = f"http://{cluster.redis_url.removeprefix('redis://').split('/')[0]}/"
        with pytest.raises(CutoutError) as refused:
            await client.submit(f"{image_server}/redirect?to={redis}")
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            f"the allow-list has it only as {host_port(image_server).replace(':', ' on port ')}"
            in refused.value.message
        ), refused.value.message
