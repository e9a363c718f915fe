"""Vendors' data_records in MariaDB, written by a cluster: once per job, in packets the server
accepts, and never lost while the database is down.

Tests that need a tiny max_allowed_packet or that kill the database start
their own mariadbd (tests/support/mariadb.py) so the shared server is left alone."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pymysql
import pytest

from cutout import AsyncClient, CutoutError
from cutout.client import build_submission
from cutout.v1 import jobs_pb2
from services.local.cluster import LocalCluster
from services.scheduler.migrate import migrate
from services.scheduler.records import (
    MysqlTarget,
)
from tests.support.cluster import KEYS
from tests.support.mariadb import MariaDBServer, rows

A = KEYS["vendor-a"]


@pytest.fixture
def private_db(tmp_path: Path) -> Iterator[MariaDBServer]:
    server = MariaDBServer(tmp_path / "mariadb", max_allowed_packet="64K")
    server.start()
    yield server
    server.stop()


async def wait_for_records(url: str, vendor: str, count: int, timeout_s: float) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = rows(url, vendor)
        except pymysql.err.OperationalError:
            found = {}
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.2)


async def log_shows(path: Path, text: str, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def submit_with_records(client: AsyncClient, image: bytes, n: int) -> list[str]:
    subs = [build_submission(image, record=("proj", f"rec-{i:04d}")) for i in range(n)]
    reply = await client.submit_batch(subs)
    assert all(o.HasField("job") for o in reply.outcomes), reply.outcomes[:3]
    return [o.job.name for o in reply.outcomes]


async def wait_all_done(
    client: AsyncClient, names: list[str], timeout_s: float
) -> list[jobs_pb2.Job]:
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = [await client.get(n) for n in names]
        if all(j.done for j in jobs) or time.monotonic() > deadline:
            return jobs
        await asyncio.sleep(0.3)


async def records_cluster(make_cluster, model_dir: Path, url: str, **env: str) -> LocalCluster:  # type: ignore[no-untyped-def]
    """A cluster of 2 nodes whose scheduler writes records to the database at url."""
    await migrate(MysqlTarget.from_url(url))
    cluster: LocalCluster = make_cluster(model_dir, nodes=2, CUTOUT_MYSQL_URL=url, **env)
    return cluster


async def test_500_jobs_update_every_record_under_a_64k_packet_limit(
    make_cluster,
    tiny_model_dir: Path,
    photos: dict[str, bytes],
    private_db: MariaDBServer,  # type: ignore[no-untyped-def]
) -> None:
    cluster = await records_cluster(make_cluster, tiny_model_dir, private_db.url)
    small = photos["coffee_small"]
    async with AsyncClient(cluster.gateway_address, A) as client:
        names = await submit_with_records(client, small, 500)
        jobs = await wait_all_done(client, names, 120)
        assert [j.state for j in jobs] == [jobs_pb2.JOB_STATE_SUCCEEDED] * 500
        found = await wait_for_records(private_db.url, "vendor-a", 500, 60)
    assert len(found) == 500
    by_job = {j.name.removeprefix("jobs/"): j for j in jobs}
    for record_id, (url, status, job_id, _) in found.items():
        assert status == "completed"
        job = by_job[job_id]  # the record points at the output of the job that named it
        assert (url, job.record.record_id) == (job.result.uri, record_id)
    log = cluster.scheduler.log_path.read_text()
    assert "record updates failed" not in log  # no statement was refused as too large


async def test_database_killed_mid_run_loses_no_update(
    make_cluster,
    tiny_model_dir: Path,
    photos: dict[str, bytes],
    private_db: MariaDBServer,  # type: ignore[no-untyped-def]
) -> None:
    cluster = await records_cluster(
        make_cluster, tiny_model_dir, private_db.url, CUTOUT_DELIVERY_RETRY_MS="200"
    )
    async with AsyncClient(cluster.gateway_address, A) as client:
        first = await submit_with_records(client, photos["coffee_small"], 50)
        assert len(await wait_for_records(private_db.url, "vendor-a", 1, 60)) >= 1
        private_db.kill()
        # While the database is down, jobs keep succeeding; their updates wait.
        more = [
            (await client.submit(photos["coffee_small"], record=("proj", f"late-{i}"))).name
            for i in range(30)
        ]
        jobs = await wait_all_done(client, first + more, 120)
        assert all(j.state == jobs_pb2.JOB_STATE_SUCCEEDED for j in jobs)
        assert await log_shows(cluster.scheduler.log_path, "record updates failed; will retry")
        private_db.start()
        found = await wait_for_records(private_db.url, "vendor-a", 80, 90)
    assert len(found) == 80
    assert {job_id for (_, _, job_id, _) in found.values()} == {
        j.name.removeprefix("jobs/") for j in jobs
    }


async def test_a_record_without_a_database_is_refused_up_front(
    make_cluster,
    tiny_model_dir: Path,
    photos: dict[str, bytes],
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    cluster = make_cluster(tiny_model_dir, start=False)
    cluster.start(start_nodes=False)
    async with AsyncClient(cluster.gateway_address, A) as client:
        with pytest.raises(CutoutError) as err:
            await client.submit(photos["coffee_small"], record=("proj", "r1"))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "CUTOUT_MYSQL_URL" in str(err.value)
    # The CLI says the same and exits non-zero.
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(photos["coffee_small"])
    cli = subprocess.run(
        [sys.executable, "-m", "cutout.cli", "submit", str(photo), "--record", "proj/r1"],
        env={**os.environ, "CUTOUT_ADDR": cluster.gateway_address, "CUTOUT_API_KEY": A},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 1 and "CUTOUT_MYSQL_URL" in cli.stdout + cli.stderr
