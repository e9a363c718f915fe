"""Hardening against the attacks of the hardening issue, each on real processes.

- Redis SIGKILLed and restarted under a loop of submits, reads and watches: every
  failure a caller sees is UNAVAILABLE (retryable), never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import grpc

from cutout.client import build_submission
from cutout.v1 import cutout_service_pb2 as pb
from cutout.v1 import cutout_service_pb2_grpc as pb_grpc
from services.local.cluster import LocalCluster
from tests.conftest import KEYS

A, B = KEYS["vendor-a"], KEYS["vendor-b"]


def raw_stub(cluster: LocalCluster) -> tuple[grpc.aio.Channel, pb_grpc.CutoutServiceStub]:
    """A channel without the client's retry policy: every status as the server sent it."""
    channel = grpc.aio.insecure_channel(cluster.gateway_address)
    return channel, pb_grpc.CutoutServiceStub(channel)


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


async def test_redis_killed_under_load_every_failure_is_unavailable(
    make_cluster, tiny_model_dir: Path, photos: dict[str, bytes]
) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(tiny_model_dir, nodes=1)
    assert cluster.redis is not None
    codes: collections.Counter[str] = collections.Counter()
    names: list[str] = []
    stop = asyncio.Event()
    channel, stub = raw_stub(cluster)
    md = bearer(A)

    async def submitter() -> None:
        while not stop.is_set():
            request = pb.SubmitJobRequest(submission=build_submission(photos["coffee_small"]))
            try:
                reply = await stub.SubmitJob(request, metadata=md, timeout=15)
                names.append(reply.job.name)
                codes["submit OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[f"submit {exc.code().name}"] += 1
                if exc.code() == grpc.StatusCode.UNKNOWN:
                    print("DETAIL", exc.details())
                await asyncio.sleep(0.05)

    async def reader() -> None:
        while not stop.is_set():
            if not names:
                await asyncio.sleep(0.05)
                continue
            name = names[-1]
            try:
                await stub.GetJob(pb.GetJobRequest(name=name), metadata=md, timeout=15)
                codes["get OK"] += 1
                await stub.ListJobs(pb.ListJobsRequest(page_size=5), metadata=md, timeout=15)
                codes["list OK"] += 1
                async for _ in stub.WatchJob(
                    pb.WatchJobRequest(name=name), metadata=md, timeout=15
                ):
                    pass
                codes["watch OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[f"read {exc.code().name}"] += 1
                await asyncio.sleep(0.05)

    workers = [asyncio.create_task(submitter()) for _ in range(4)]
    workers += [asyncio.create_task(reader()) for _ in range(2)]
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while codes["submit OK"] < 20 and loop.time() < deadline:
            await asyncio.sleep(0.1)
        for _ in range(2):
            await asyncio.to_thread(cluster.redis.kill)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(cluster.redis.start)
            before = codes["submit OK"]
            while codes["submit OK"] < before + 20 and loop.time() < deadline:
                await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await channel.close()
    failures = {k: n for k, n in codes.items() if not k.endswith(" OK")}
    assert failures, f"the kill went unnoticed: {codes}"
    assert set(failures) <= {"submit UNAVAILABLE", "read UNAVAILABLE"}, codes
    assert codes["submit OK"] >= 40, codes
