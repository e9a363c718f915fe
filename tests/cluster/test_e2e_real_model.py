"""A real photo through the whole path: gateway -> scheduler -> node (real IS-Net model) -> back."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image

from cutout import AsyncClient
from cutout.v1 import jobs_pb2
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS

SERVICES = {
    "gateway": "cutout.v1.CutoutService",
    "scheduler": "cutout.internal.v1.SchedulerService",
    "node-1": "cutout.internal.v1.InferenceService",
}


def rembg_alpha(model_dir: Path, data: bytes) -> np.ndarray:
    """What rembg.remove itself gives for the same model and input."""
    os.environ["U2NET_HOME"] = str(model_dir)
    from rembg import new_session, remove

    session = new_session("isnet-general-use")
    out = remove(data, session=session)
    assert isinstance(out, bytes)
    return np.asarray(Image.open(io.BytesIO(out)).getchannel("A"), dtype=np.float64)


async def run_job(addr: str, data: bytes) -> tuple[list[jobs_pb2.Job], bytes]:
    async with AsyncClient(addr, KEYS["vendor-a"]) as client:
        job = await client.submit(data)
        seen = [event.job async for event in client.watch(job.name)]
        _, output = await client.result(job.name)
    return seen, output


def assert_lifecycle(seen: list[jobs_pb2.Job]) -> None:
    states: list[int] = []
    for job in seen:
        if not states or states[-1] != job.state:
            states.append(job.state)
    assert states == [
        jobs_pb2.JOB_STATE_QUEUED,
        jobs_pb2.JOB_STATE_RUNNING,
        jobs_pb2.JOB_STATE_SUCCEEDED,
    ]
    progress = [job.progress_percent for job in seen]
    assert progress == sorted(progress), f"progress went backwards: {progress}"
    assert progress[-1] == 100
    # Every pipeline stage a watcher should see on the way.
    stages = {job.stage for job in seen}
    assert {
        jobs_pb2.STAGE_QUEUED,
        jobs_pb2.STAGE_INFERENCE,
        jobs_pb2.STAGE_ENCODING,
        jobs_pb2.STAGE_DONE,
    } <= stages


@pytest.fixture
def real_cluster(make_cluster, real_model_dir: Path) -> LocalCluster:  # type: ignore[no-untyped-def]
    return make_cluster(real_model_dir, nodes=1, CUTOUT_ORT_THREADS="2")


async def test_real_photos_match_rembg(
    real_cluster: LocalCluster, real_model_dir: Path, photos: dict[str, bytes]
) -> None:
    names = ["astronaut", "chelsea", "coffee"]
    results = await asyncio.gather(
        *(run_job(real_cluster.gateway_address, photos[n]) for n in names)
    )
    for name, (seen, output) in zip(names, results, strict=True):
        assert_lifecycle(seen)
        final = seen[-1]
        cutout = Image.open(io.BytesIO(output))
        assert cutout.format == "PNG" and cutout.mode == "RGBA"
        original = Image.open(io.BytesIO(photos[name]))
        assert cutout.size == original.size == (final.result.width_px, final.result.height_px)
        ours = np.asarray(cutout.getchannel("A"), dtype=np.float64)
        theirs = rembg_alpha(real_model_dir, photos[name])
        mad = np.abs(ours - theirs).mean()
        assert mad <= 2.0, f"{name}: mean alpha difference {mad:.3f}/255 from rembg.remove"
        iou = ((ours > 127.5) & (theirs > 127.5)).sum() / ((ours > 127.5) | (theirs > 127.5)).sum()
        assert iou >= 0.99, f"{name}: mask IoU {iou:.4f} with rembg.remove"
        # Not a trivial mask: the subject is kept and the background removed.
        assert 0.1 < (ours > 127).mean() < 0.9


def test_reflection_and_health_on_every_server(real_cluster: LocalCluster) -> None:
    servers = {
        "gateway": real_cluster.gateway,
        "scheduler": real_cluster.scheduler,
        "node-1": real_cluster.nodes[0],
    }
    listed: set[str] = set()
    for name, service in servers.items():
        assert service is not None
        with grpc.insecure_channel(service.address) as channel:
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
            assert {SERVICES[name], "grpc.health.v1.Health"} <= services
            listed |= services
            health = health_pb2_grpc.HealthStub(channel)
            for target in ("", SERVICES[name]):
                reply = health.Check(health_pb2.HealthCheckRequest(service=target), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert set(SERVICES.values()) <= listed


async def test_face_crops_through_the_cluster(
    real_cluster: LocalCluster, photos: dict[str, bytes]
) -> None:
    async with AsyncClient(real_cluster.gateway_address, KEYS["vendor-a"]) as client:
        passport = await client.submit(photos["astronaut"], op="crop-face", mode="passport")
        no_face = await client.submit(photos["coffee"], op="crop-face", mode="passport")
        seen = [event.job async for event in client.watch(passport.name)]
        result, data = await client.result(passport.name)
        async for event in client.watch(no_face.name):
            failed = event.job
    stages = [job.stage for job in seen]
    for stage in (jobs_pb2.STAGE_DETECTING, jobs_pb2.STAGE_INFERENCE, jobs_pb2.STAGE_RESIZING):
        assert stage in stages
    img = Image.open(io.BytesIO(data))
    assert img.size == (827, 1063) == (result.width_px, result.height_px)
    assert np.asarray(img.convert("RGB"))[:40].min() >= 245  # white above the head
    box = result.subject_box
    assert abs(box.x_px + box.width_px / 2 - 827 / 2) < 0.04 * 827
    # No face: a clear per-job error, not retried (a retry cannot find one either).
    assert failed.state == jobs_pb2.JOB_STATE_FAILED
    assert failed.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "no face found" in failed.error.message
    assert failed.attempt == 1 and not failed.dead_lettered
