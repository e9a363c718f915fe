"""TLS on the public port: a client that trusts the CA gets in; plaintext and strangers do not."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cutout import AsyncClient, CutoutError
from cutout.v1 import jobs_pb2
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS
from tests.support.tls import make_ca, make_server_cert


async def test_gateway_serves_tls_when_a_certificate_is_configured(
    make_cluster,
    tiny_model_dir: Path,
    tmp_path: Path,
    photos: dict[str, bytes],  # type: ignore[no-untyped-def]
) -> None:
    ca_key, ca = make_ca(tmp_path, "ca")
    make_ca(tmp_path, "stranger")
    make_server_cert(tmp_path, ca_key, ca)
    cluster: LocalCluster = make_cluster(
        tiny_model_dir,
        nodes=1,
        CUTOUT_TLS_CERT=str(tmp_path / "gateway.pem"),
        CUTOUT_TLS_KEY=str(tmp_path / "gateway.key"),
    )
    addr, key = cluster.gateway_address, KEYS["vendor-a"]
    async with AsyncClient(addr, key, tls=str(tmp_path / "ca.pem")) as client:
        job = await client.submit(photos["coffee_small"])
        async for event in client.watch(job.name):
            last = event.job
        assert last.state == jobs_pb2.JOB_STATE_SUCCEEDED
    for tls in (False, str(tmp_path / "stranger.pem")):  # plaintext, or a CA it does not know
        async with AsyncClient(addr, key, tls=tls, timeout_s=3) as client:
            with pytest.raises(CutoutError) as err:
                await client.stats()
        # The handshake fails, so the call never reaches the service (the client's
        # retry policy may turn UNAVAILABLE into running out its deadline).
        assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
