"""Outages as callers see them (issue 26): real processes, statuses in the project's words.

A scheduler that is down answers through the gateway as UNAVAILABLE (callers retry on
it) with a message of the project's own, never gRPC's transport text with the
scheduler's internal address ("failed to connect to all addresses; last error: UNKNOWN:
ipv4:127.0.0.1:37667: ...", "Stream removed (Socket closed)").
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cutout.client import build_submission
from cutout.v1 import cutout_service_pb2 as pb
from cutout.v1 import cutout_service_pb2_grpc as pb_grpc
from cutout.v1 import jobs_pb2
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS

AUTH = (("authorization", f"Bearer {KEYS['vendor-a']}"),)
SCHEDULER_DOWN = "the scheduler is unavailable, retry shortly"
CODES = {code.value[0]: code for code in grpc.StatusCode}
# gRPC's transport text, and any host:port.
INTERNALS = re.compile(
    r"127\.0\.0\.1|ipv[46]:|failed to connect|connection refused|socket closed|stream removed"
    r"|:\d{2,5}\b",
    re.IGNORECASE,
)


def retry_after_s(exc: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay the status carries, if any."""
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


async def refused(call: Any) -> grpc.aio.AioRpcError:
    """The error a unary call ends with, or a stream at its next read."""
    try:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            await asyncio.wait_for(call.read(), 30)
        else:
            await asyncio.wait_for(call, 30)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded with the scheduler down")


async def test_a_scheduler_outage_answers_unavailable_in_the_projects_own_words(
    make_cluster: Callable[..., LocalCluster], tiny_model_dir: Path, photos: dict[str, bytes]
) -> None:
    cluster = make_cluster(tiny_model_dir, start=False)
    cluster.start(start_nodes=False)  # no node: the job stays queued, its watch open
    assert cluster.scheduler is not None
    submit = pb.SubmitJobRequest(submission=build_submission(photos["coffee_small"]))
    batch = pb.SubmitBatchRequest(submissions=[submit.submission])
    # A channel without the client's retry policy: every status as the gateway sent it.
    async with grpc.aio.insecure_channel(cluster.gateway_address) as channel:
        stub = pb_grpc.CutoutServiceStub(channel)
        job = (await stub.SubmitJob(submit, metadata=AUTH)).job
        get = pb.GetJobRequest(name=job.name)
        watch = pb.WatchJobRequest(name=job.name)
        watching = stub.WatchJob(watch, metadata=AUTH)
        first = cast(pb.WatchJobResponse, await asyncio.wait_for(watching.read(), 30))
        assert first.event.job.state == jobs_pb2.JOB_STATE_QUEUED

        cluster.kill(cluster.scheduler)  # SIGKILL, with the watch open through the gateway
        answers = {
            "WatchJob, open": await refused(watching),
            "SubmitJob": await refused(stub.SubmitJob(submit, metadata=AUTH)),
            "GetJob": await refused(stub.GetJob(get, metadata=AUTH)),
            "WatchJob": await refused(stub.WatchJob(watch, metadata=AUTH)),
        }
        (item,) = (await stub.SubmitBatch(batch, metadata=AUTH)).outcomes
        said = {what: (exc.code(), exc.details() or "") for what, exc in answers.items()}
        said["SubmitBatch item"] = (CODES[item.error.code], item.error.message)
        assert {what: INTERNALS.findall(details) for what, (_, details) in said.items()} == {
            what: [] for what in said
        }
        assert said == {what: (grpc.StatusCode.UNAVAILABLE, SCHEDULER_DOWN) for what in said}
        assert {retry_after_s(exc) for exc in answers.values()} == {1.0}

        # Back on the same address: the gateway serves again once its channel reconnects.
        await asyncio.to_thread(cluster.start_scheduler)
        deadline = time.monotonic() + 60
        while True:
            try:
                again = await stub.GetJob(get, metadata=AUTH)
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
                assert exc.details() == SCHEDULER_DOWN, exc.details()
                assert time.monotonic() < deadline, "the gateway did not serve again in 60 s"
                await asyncio.sleep(0.2)
        assert again.job.state == jobs_pb2.JOB_STATE_QUEUED
        assert (await stub.SubmitJob(submit, metadata=AUTH)).job.name
        watching = stub.WatchJob(watch, metadata=AUTH)
        event = cast(pb.WatchJobResponse, await asyncio.wait_for(watching.read(), 30))
        assert event.event.job.name == job.name
        watching.cancel()


async def test_the_schedulers_own_unavailable_reaches_callers_as_it_sent_it(
    make_cluster: Callable[..., LocalCluster], tiny_model_dir: Path, photos: dict[str, bytes]
) -> None:
    """Only a scheduler out of reach is answered in the gateway's words: an UNAVAILABLE
    the scheduler sent itself (its Redis down) reaches the caller as it was sent."""
    cluster = make_cluster(tiny_model_dir, start=False)
    cluster.start(start_nodes=False)
    assert cluster.redis is not None
    submit = pb.SubmitJobRequest(submission=build_submission(photos["coffee_small"]))
    async with grpc.aio.insecure_channel(cluster.gateway_address) as channel:
        stub = pb_grpc.CutoutServiceStub(channel)
        job = (await stub.SubmitJob(submit, metadata=AUTH)).job
        await asyncio.to_thread(cluster.redis.kill)
        exc = await refused(stub.GetJob(pb.GetJobRequest(name=job.name), metadata=AUTH))
    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
    # Its own words, and nothing of Redis's address or the driver's text.
    assert exc.details() == "the job store is unavailable, retry shortly"
    assert retry_after_s(exc) == 1.0
