"""One Work stream per node (issue 20), the node's one job API (issue 27): credits, a
stream broken mid-job, a node that does not serve it.

The nodes are bench/fixed_node.py processes (a fixed slot time, no model), so
a job's timing is known; they count from their side what the scheduler sent
on each stream, and write it on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from cutout import AsyncClient
from cutout.client import build_submission
from cutout.v1 import jobs_pb2
from services.common.internal_auth import InternalToken, new_token
from services.internal.v1 import inference_service_pb2 as pb
from services.internal.v1 import inference_service_pb2_grpc as pb_grpc
from services.local.cluster import ClusterConfig
from tests.support.cluster import KEYS

ROOT = Path(__file__).resolve().parents[2]  # the checkout: bench/ is imported from it
sys.path.insert(0, str(ROOT))

from bench import peers  # noqa: E402
from bench.fixed_node import FixedServiceNode, create_server  # noqa: E402
from bench.scale import FixedNodeCluster  # noqa: E402

A = KEYS["vendor-a"]


def fixed_cluster(
    tmp_path: Path,
    model_dir: Path,
    nodes: int,
    slots: int,
    service_ms: int,
    work: bool = True,
    prefetch: int = 1,
    **extra_env: str,
) -> FixedNodeCluster:
    (tmp_path / "stats").mkdir()
    return FixedNodeCluster(
        ClusterConfig(
            nodes=nodes,
            gateway_port=0,
            workdir=tmp_path / "cluster",
            model_dir=model_dir,
            api_keys=dict(KEYS),
            extra_env={
                "CUTOUT_NODE_POLL_S": "0.2",
                "CUTOUT_NODE_CAPACITY": str(slots),
                "CUTOUT_FIXED_WORK": "1" if work else "0",
                "CUTOUT_NODE_PREFETCH": str(prefetch),
                **extra_env,
            },
        ),
        service_ms=service_ms,
        stats_dir=tmp_path / "stats",
    )


def counters(cluster: FixedNodeCluster, index: int) -> dict[str, int]:
    assert cluster.stats_dir is not None
    return dict(json.loads((cluster.stats_dir / f"fixed-{index + 1}.json").read_text()))


def logged(path: Path) -> list[dict[str, Any]]:
    """A service's log lines so far: its JSON records, and anything else it wrote to
    stderr as {"raw": line}; a line still being written is left for the next read."""
    lines = path.read_text(errors="replace").split("\n")[:-1]
    out: list[dict[str, Any]] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        out.append(record if isinstance(record, dict) else {"raw": line})
    return out


async def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


async def final(client: AsyncClient, name: str) -> jobs_pb2.Job:
    job = jobs_pb2.Job()
    async for event in client.watch(name):
        job = event.job
        if job.done:
            break
    return job


async def backlog(cluster: FixedNodeCluster, jobs: int) -> list[dict[str, int]]:
    """Submit `jobs` at once, wait until every one succeeded, stop the nodes; what
    each node counted."""
    try:
        async with AsyncClient(cluster.gateway_address, A) as client:
            await asyncio.sleep(1.0)  # the nodes polled and their streams open
            image = peers.small_jpeg()
            reply = await client.submit_batch([build_submission(image) for _ in range(jobs)])
            names = [o.job.name for o in reply.outcomes if o.HasField("job")]
            assert len(set(names)) == jobs
            for name in names:
                done = await asyncio.wait_for(final(client, name), 60)
                assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error.message
        for node in list(cluster.nodes):
            cluster.terminate(node)
        return [counters(cluster, i) for i in range(len(cluster.nodes))]
    finally:
        cluster.stop()


async def test_work_stream_killed_mid_job_job_finishes_on_another_node(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cluster = fixed_cluster(tmp_path, tiny_model_dir, nodes=2, slots=1, service_ms=3000)
    cluster.start()
    try:
        async with AsyncClient(cluster.gateway_address, A) as client:
            await asyncio.sleep(1.0)  # both nodes polled and their streams open
            job = await client.submit(peers.small_jpeg())
            async for event in client.watch(job.name):
                if event.job.state == jobs_pb2.JOB_STATE_RUNNING and event.job.node:
                    running = event.job
                    break
            await asyncio.sleep(0.5)  # on the node, well inside its 3 s slot
            victim = next(n for n in cluster.nodes if n.address == running.node)
            cluster.kill(victim)  # SIGKILL: the stream breaks with the job on it
            done = await asyncio.wait_for(final(client, job.name), 60)
            assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error.message
            assert done.node != victim.address
            assert done.attempt == 2
        survivor = next(n for n in cluster.nodes if n is not victim)
        index = cluster.nodes.index(survivor)
        cluster.terminate(survivor)
        seen = counters(cluster, index)
    finally:
        cluster.stop()
    assert seen["completed"] == 1
    assert seen["work_streams"] >= 1
    assert seen["overdrawn"] == 0


async def test_a_node_killed_under_load_leaves_no_error_in_the_scheduler_log(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Issue 26: a node SIGKILLed is routine, not an error. Each loss left the Work
    stream's request iterator waiting after its call had ended, and the garbage collector
    later destroyed it pending: "Task was destroyed but it is pending!" and "aclose():
    asynchronous generator is already running" at ERROR, again for every stream the
    scheduler tried to reopen to the dead node. Now nothing reaches ERROR, and every job
    still finishes on the survivor."""
    cluster = fixed_cluster(
        tmp_path, tiny_model_dir, nodes=2, slots=2, service_ms=300, CUTOUT_LOG_LEVEL="DEBUG"
    )
    cluster.start()
    try:
        assert cluster.scheduler is not None
        log = cluster.scheduler.log_path

        def streams_open() -> bool:
            opened = {r.get("node") for r in logged(log) if r.get("msg") == "work stream open"}
            return {n.address for n in cluster.nodes} <= opened

        await wait_for(streams_open, "a Work stream open to each node")
        async with AsyncClient(cluster.gateway_address, A) as client:
            image = peers.small_jpeg()
            reply = await client.submit_batch([build_submission(image) for _ in range(40)])
            names = [o.job.name for o in reply.outcomes]
            async for event in client.watch(names[0]):
                if event.job.state == jobs_pb2.JOB_STATE_RUNNING and event.job.node:
                    running = event.job
                    break
            victim = next(n for n in cluster.nodes if n.address == running.node)
            cluster.kill(victim)  # SIGKILL with jobs on its stream and more queued
            for name in names:
                done = await asyncio.wait_for(final(client, name), 60)
                assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error.message

        def errors() -> list[str]:
            """ERROR lines, and what Python itself wrote to stderr (unraisable exceptions)."""
            return [
                str(r.get("msg", r.get("raw")))[:300]
                for r in logged(log)
                if r.get("level") in ("error", "critical")
                or "Task was destroyed" in str(r)
                or "raw" in r
            ]

        def reopened() -> int:
            """Work streams to the dead node that ended: its own, then each one the
            scheduler opened again since, refused (logged at DEBUG)."""
            return sum(
                1
                for r in logged(log)
                if r.get("msg") == "work stream broke"
                and r.get("level") == "debug"
                and r.get("node") == victim.address
            )

        # Every stream left behind is garbage by the time the next one opens; several
        # opened give the collector its chances to find them (it found them within two).
        await wait_for(lambda: reopened() >= 8 or bool(errors()), "streams reopened")
        assert errors() == [], errors()
        assert reopened() >= 8
    finally:
        cluster.stop()


async def test_scheduler_never_sends_beyond_the_credit_a_node_granted(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    cluster = fixed_cluster(tmp_path, tiny_model_dir, nodes=2, slots=2, service_ms=30)
    cluster.start()
    seen = await backlog(cluster, 60)
    assert sum(s["completed"] for s in seen) == 60
    for s in seen:
        assert s["overdrawn"] == 0  # never a job beyond the stream's credit
        # The credit granted: its 2 slots and 1 job waiting for one (prefetch)...
        assert s["most_outstanding"] <= 3
        assert s["max_in_flight"] <= 2  # ...but never more running than its slots
        assert s["refused"] == 0


async def test_jobs_claimed_together_travel_together(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Several jobs in one Work write, and the node's replies likewise (issue 20)."""
    cluster = fixed_cluster(tmp_path, tiny_model_dir, nodes=1, slots=8, service_ms=30)
    cluster.start()
    (seen,) = await backlog(cluster, 80)
    assert seen["completed"] == seen["work_jobs_read"] == 80
    assert seen["overdrawn"] == seen["refused"] == 0
    assert seen["most_outstanding"] <= 8 + 1  # slots + prefetch
    assert seen["max_in_flight"] <= 8
    # 80 jobs over 8 slots: freed slots are refilled several at a time.
    assert seen["work_reads"] < 80
    assert seen["work_writes"] < seen["work_messages_written"]


async def test_a_node_that_does_not_serve_work_gets_no_job_and_loses_none(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The scheduler reaches nodes by the Work stream only: a node that does not serve it
    (another version) is named in a warning and gets nothing; its jobs wait, queued, for
    a node that does."""
    cluster = fixed_cluster(tmp_path, tiny_model_dir, nodes=1, slots=2, service_ms=20, work=False)
    cluster.start()
    assert cluster.scheduler is not None
    log_path = cluster.scheduler.log_path
    try:
        async with AsyncClient(cluster.gateway_address, A) as client:
            image = peers.small_jpeg()
            reply = await client.submit_batch([build_submission(image) for _ in range(3)])
            await wait_for(
                lambda: any(
                    r.get("msg") == "node does not serve Work; no jobs go to it"
                    for r in logged(log_path)
                ),
                "the scheduler's warning about the node",
            )
            for outcome in reply.outcomes:
                job = await client.get(outcome.job.name)
                assert job.state == jobs_pb2.JOB_STATE_QUEUED
        cluster.terminate(cluster.nodes[0])
        seen = counters(cluster, 0)
    finally:
        cluster.stop()
    assert seen["completed"] == seen["work_streams"] == 0


async def test_node_refuses_and_counts_a_job_sent_without_credit() -> None:
    """The node-side check the tests above rely on does catch an overdraft."""
    token = InternalToken(new_token())
    node = FixedServiceNode(slots=2, service_s=0.5, node_id="n", models=["tiny"])
    server, port = await create_server(node, "127.0.0.1:0", token)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            unsigned = stub.Work()  # the internal token guards Work as every internal call
            with pytest.raises(grpc.aio.AioRpcError) as refused_call:
                await unsigned.read()
            assert refused_call.value.code() == grpc.StatusCode.UNAUTHENTICATED
            call = stub.Work(metadata=token.metadata())
            first = await call.read()
            assert first.credit.jobs == 2
            for attempt in (1, 2, 3):
                job = pb.WorkJob(name=f"jobs/j{attempt}", attempt=attempt, image=b"x")
                await call.write(pb.WorkRequest(job=job))
            refused = await call.read()
            assert (refused.name, refused.attempt) == ("jobs/j3", 3)
            assert refused.end.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            await call.write(pb.WorkRequest(cancel=pb.WorkCancel(name="jobs/j2", attempt=2)))
            ends: dict[str, int] = {}
            credits = 0
            while len(ends) < 2 or credits < 2:
                message = await asyncio.wait_for(call.read(), 5)
                if message.HasField("credit"):
                    credits += message.credit.jobs
                elif message.HasField("end"):
                    ends[message.name] = message.end.code
            assert ends == {"jobs/j1": 0, "jobs/j2": grpc.StatusCode.CANCELLED.value[0]}
            await call.done_writing()
    finally:
        await server.stop(None)
    assert node.sessions[0].overdrawn == 1
    assert node.completed == 1


@pytest.mark.parametrize("prefetch", [0, 2])
async def test_jobs_sent_ahead_wait_on_the_node_and_never_run_beyond_its_slots(
    tiny_model_dir: Path, tmp_path: Path, prefetch: int
) -> None:
    """With CUTOUT_NODE_PREFETCH, a Work stream may have that many jobs waiting on the
    node for a slot (a freed slot starts one at once); none is refused, none runs
    beyond the slots, and with 0 nothing is ever sent ahead."""
    cluster = fixed_cluster(
        tmp_path, tiny_model_dir, nodes=2, slots=2, service_ms=40, prefetch=prefetch
    )
    cluster.start()
    seen = await backlog(cluster, 60)
    assert sum(s["completed"] for s in seen) == 60
    for s in seen:
        assert s["refused"] == s["overdrawn"] == 0
        assert s["max_in_flight"] <= 2
        assert s["most_outstanding"] <= 2 + prefetch
    # A 60-job backlog on 2 x 2 slots keeps every stream's waiting room in use.
    assert max(s["most_outstanding"] for s in seen) == 2 + prefetch
