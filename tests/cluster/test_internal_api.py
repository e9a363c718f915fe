"""One public API served where it lives, and internal calls that need the cluster's token.

Real processes: the gateway relays every public method but the submits to the
scheduler, which serves them itself; nothing but a holder of the internal
token gets an answer from the scheduler's or a node's port, whatever vendor
id it claims.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cutout import AsyncClient, CutoutError
from cutout.v1 import cutout_service_pb2 as pb
from cutout.v1 import cutout_service_pb2_grpc as pb_grpc
from services.common.config import PROJECT_ROOT
from services.common.internal_auth import TOKEN_HEADER, VENDOR_HEADER, new_token
from services.internal.v1 import inference_service_pb2 as ipb
from services.internal.v1 import inference_service_pb2_grpc as ipb_grpc
from services.internal.v1 import scheduler_service_pb2 as spb
from services.internal.v1 import scheduler_service_pb2_grpc as spb_grpc
from services.local.cluster import LocalCluster, Service
from tests.support.cluster import KEYS, start_cluster

A, B = KEYS["vendor-a"], KEYS["vendor-b"]
NEXT = new_token()  # a token being rotated in: accepted beside the current one
ROTATING = {"CUTOUT_INTERNAL_TOKENS_ACCEPTED": NEXT}


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LocalCluster]:
    """No node ever starts: every job stays QUEUED, so watches stay open."""
    cluster = start_cluster(tmp_path_factory.mktemp("idle"), tiny_model_dir, False, **ROTATING)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("tiny"), tiny_model_dir, **ROTATING)
    yield cluster
    cluster.stop()


def _scheduler(cluster: LocalCluster) -> str:
    assert cluster.scheduler is not None
    return cluster.scheduler.address


async def _code_of(call: object) -> grpc.StatusCode:
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall | grpc.aio.StreamStreamCall):
            async for _ in call:
                pass
        else:
            await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_forged_vendor_id_on_the_scheduler_port_gets_nothing(
    idle: LocalCluster, photos: dict[str, bytes]
) -> None:
    async with AsyncClient(idle.gateway_address, A) as client:
        job = await client.submit(photos["coffee_small"])
    forged = [
        ((VENDOR_HEADER, "vendor-a"),),  # no token at all, as an attacker on the network
        ((VENDOR_HEADER, "vendor-a"), (TOKEN_HEADER, "x" * 43)),  # a guessed token
        ((VENDOR_HEADER, "vendor-a"), ("authorization", f"Bearer {A}")),  # a vendor's own key
    ]
    token = idle.config.internal_token
    async with grpc.aio.insecure_channel(_scheduler(idle)) as channel:
        stub = pb_grpc.CutoutServiceStub(channel)
        for metadata in forged:
            get = stub.GetJob(pb.GetJobRequest(name=job.name), metadata=metadata, timeout=10)
            assert await _code_of(get) == grpc.StatusCode.UNAUTHENTICATED
            listed = stub.ListJobs(pb.ListJobsRequest(), metadata=metadata, timeout=10)
            assert await _code_of(listed) == grpc.StatusCode.UNAUTHENTICATED
            watch = stub.WatchJob(pb.WatchJobRequest(name=job.name), metadata=metadata, timeout=10)
            assert await _code_of(watch) == grpc.StatusCode.UNAUTHENTICATED
        # A valid token still needs the vendor the gateway vouches for.
        get = stub.GetJob(
            pb.GetJobRequest(name=job.name), metadata=((TOKEN_HEADER, token),), timeout=10
        )
        assert await _code_of(get) == grpc.StatusCode.UNAUTHENTICATED
        # What was refused is the credential, not the path: with it (current or being
        # rotated in), the same call answers.
        for secret in (token, NEXT):
            got = await stub.GetJob(
                pb.GetJobRequest(name=job.name),
                metadata=((TOKEN_HEADER, secret), (VENDOR_HEADER, "vendor-a")),
                timeout=10,
            )
            assert got.job.name == job.name
        # Submits are the gateway's: the scheduler does not take them even from an insider.
        submit = stub.SubmitJob(
            pb.SubmitJobRequest(),
            metadata=((TOKEN_HEADER, token), (VENDOR_HEADER, "vendor-a")),
            timeout=10,
        )
        assert await _code_of(submit) == grpc.StatusCode.UNIMPLEMENTED


async def test_enqueue_without_the_token_is_refused_and_queues_nothing(
    idle: LocalCluster, photos: dict[str, bytes]
) -> None:
    item = spb.JobToEnqueue(vendor_id="vendor-b", input_pixels=15_000)
    item.submission.image.content = photos["coffee_small"]
    item.submission.operation.remove_background.model = "tiny"
    async with grpc.aio.insecure_channel(_scheduler(idle)) as channel:
        call = spb_grpc.SchedulerServiceStub(channel).EnqueueJobs(
            spb.EnqueueJobsRequest(jobs=[item]), timeout=10
        )
        assert await _code_of(call) == grpc.StatusCode.UNAUTHENTICATED
    async with AsyncClient(idle.gateway_address, B) as client:
        assert not (await client.list_jobs()).jobs


async def test_nodes_answer_only_the_scheduler_but_probes_always(tiny: LocalCluster) -> None:
    node = tiny.nodes[0]
    token = tiny.config.internal_token
    async with grpc.aio.insecure_channel(node.address) as channel:
        stub = ipb_grpc.InferenceServiceStub(channel)
        assert await _code_of(stub.GetLoad(ipb.GetLoadRequest(), timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        job = ipb.WorkRequest(job=ipb.WorkJob(name="jobs/x", attempt=1, image=b"\xff\xd8"))
        work = stub.Work(iter([job]), timeout=10)
        assert await _code_of(work) == grpc.StatusCode.UNAUTHENTICATED
        load = await stub.GetLoad(
            ipb.GetLoadRequest(), metadata=((TOKEN_HEADER, token),), timeout=10
        )
        assert load.capacity >= 1
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("token", ["", "short"])
def test_services_refuse_to_start_without_a_usable_token(token: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CUTOUT_INTERNAL_TOKEN": token,
        "PYTHONPATH": f"{PROJECT_ROOT}{os.pathsep}{PROJECT_ROOT / 'clients' / 'python'}",
        "CUTOUT_METRICS_LISTEN": "",
    }
    for module in ("services.scheduler", "services.gateway", "services.inference"):
        run = subprocess.run(
            [sys.executable, "-m", module], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode != 0
        assert "CUTOUT_INTERNAL_TOKEN" in run.stderr + run.stdout, (module, run.stderr[-2000:])


# --- the relay: statuses, details, deadlines and cancellation pass through ------------------


def _watch_calls_ended(svc: Service) -> float:
    with urllib.request.urlopen(svc.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "cutout_rpc_requests_total"
        and s.labels.get("service") == "CutoutService"
        and s.labels.get("method") == "WatchJob"
    )


async def _until(condition: object, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not reached in {timeout_s} s: {what}"
        await asyncio.sleep(0.1)


async def test_relayed_errors_keep_their_code_message_and_details(idle: LocalCluster) -> None:
    async with AsyncClient(idle.gateway_address, A) as client:
        with pytest.raises(CutoutError) as bad:
            await client.list_jobs(page_size=1000)
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert bad.value.violations == [("page_size", "must be 1-500")]
        with pytest.raises(CutoutError) as missing:
            await client.get("jobs/" + "0" * 32)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        assert "0" * 32 in missing.value.message


async def test_a_watch_that_ends_at_the_gateway_ends_at_the_scheduler(
    idle: LocalCluster, photos: dict[str, bytes]
) -> None:
    assert idle.scheduler is not None
    scheduler = idle.scheduler
    async with AsyncClient(idle.gateway_address, A) as client:
        job = await client.submit(photos["coffee_small"])
    async with grpc.aio.insecure_channel(idle.gateway_address) as channel:
        stub = pb_grpc.CutoutServiceStub(channel)
        auth = (("authorization", f"Bearer {A}"),)
        # The caller's deadline travels with the call: the scheduler's stream ends with it.
        before = _watch_calls_ended(scheduler)
        watch = stub.WatchJob(pb.WatchJobRequest(name=job.name), metadata=auth, timeout=1.5)
        assert await _code_of(watch) == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until(
            lambda: _watch_calls_ended(scheduler) >= before + 1,
            f"the scheduler's WatchJob ended after the deadline ({before} before)",
        )
        # A caller that hangs up frees the scheduler's stream at once.
        watch = stub.WatchJob(pb.WatchJobRequest(name=job.name), metadata=auth)
        first = await watch.read()
        assert first.event.job.state == 1  # QUEUED: the job never runs here
        watch.cancel()
        await _until(
            lambda: _watch_calls_ended(scheduler) >= before + 2,
            f"the scheduler's WatchJob ended after the cancel ({before} before, "
            f"{_watch_calls_ended(scheduler)} now)",
        )
