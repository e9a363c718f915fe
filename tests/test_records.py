"""Vendors' data_records in MariaDB: written once per job, in packets the server accepts,
and never lost while the database is down.

Record-writer tests use the shared MariaDB on 127.0.0.1:3306 (database `test`).
Tests that need a tiny max_allowed_packet or that kill the database start
their own mariadbd (tests/mariadb.py) so the shared server is left alone.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
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
    PACKET_MARGIN,
    MysqlTarget,
    RecordUpdate,
    RecordWriter,
    statements,
)
from tests.conftest import KEYS
from tests.mariadb import MariaDBServer

SHARED = "mysql://root@127.0.0.1:3306/test"
A = KEYS["vendor-a"]


def rows(url: str, vendor: str) -> dict[str, tuple[str, str, str, str]]:
    """record_id -> (photo_url, processing_status, job_id, processed_at) for one vendor."""
    t = MysqlTarget.from_url(url)
    conn = pymysql.connect(host=t.host, port=t.port, user=t.user, database=t.database)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT record_id, photo_url, processing_status, job_id, processed_at"
                " FROM data_records WHERE vendor_id = %s",
                (vendor,),
            )
            return {r[0]: (r[1], r[2], r[3], str(r[4])) for r in cur.fetchall()}
    finally:
        conn.close()


def update(vendor: str, record: str, job_id: str, created_ms: int, url: str) -> RecordUpdate:
    return RecordUpdate(
        vendor_id=vendor,
        project_id="proj",
        record_id=record,
        photo_url=url,
        job_id=job_id,
        job_created_ms=created_ms,
        processed_at=datetime.now(UTC),
    )


@pytest.fixture
def private_db(tmp_path: Path) -> Iterator[MariaDBServer]:
    server = MariaDBServer(tmp_path / "mariadb", max_allowed_packet="64K")
    server.start()
    yield server
    server.stop()


def test_statements_are_chunked_under_max_allowed_packet() -> None:
    updates = [
        update("v", f"rec-{i}", uuid.uuid4().hex, i, f"https://x/{'p' * 150}/{i}.png")
        for i in range(500)
    ]
    sqls = statements(updates, 64 * 1024)
    assert len(sqls) > 1
    assert all(len(s.encode()) <= 64 * 1024 - PACKET_MARGIN for s in sqls)
    assert sum(s.count("'rec-") for s in sqls) == 500  # every row, once
    with pytest.raises(ValueError, match="larger than max_allowed_packet"):
        statements(updates[:1], 2048)


async def test_a_job_applies_once_and_an_older_job_never_overwrites_a_newer_one() -> None:
    await migrate(MysqlTarget.from_url(SHARED))
    await migrate(MysqlTarget.from_url(SHARED))  # a second run is a no-op
    writer = RecordWriter(MysqlTarget.from_url(SHARED))
    vendor = f"v-{uuid.uuid4().hex[:8]}"
    old_job, new_job = uuid.uuid4().hex, uuid.uuid4().hex
    try:
        assert await writer.apply([update(vendor, "r1", new_job, 2000, "https://new")]) == 1
        # The same job delivered again (a retry, a duplicate delivery): nothing changes.
        assert await writer.apply([update(vendor, "r1", new_job, 2000, "https://new")]) == 0
        # An older job finishing late: ignored.
        assert await writer.apply([update(vendor, "r1", old_job, 1000, "https://old")]) == 0
        assert rows(SHARED, vendor)["r1"][:3] == ("https://new", "completed", new_job)
        # A newer one wins (2 = one row updated, as MySQL counts an upsert).
        newest = uuid.uuid4().hex
        assert await writer.apply([update(vendor, "r1", newest, 3000, "https://newest")]) == 2
        assert rows(SHARED, vendor)["r1"][:3] == ("https://newest", "completed", newest)
    finally:
        await writer.close()


async def test_a_row_from_the_old_system_is_updated_in_place() -> None:
    await migrate(MysqlTarget.from_url(SHARED))
    vendor = f"v-{uuid.uuid4().hex[:8]}"
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test")
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO data_records (vendor_id, project_id, record_id, photo_url)"
            " VALUES (%s, 'proj', 'legacy', 'http://old-system/photo.jpg')",
            (vendor,),
        )
    conn.commit()
    conn.close()
    writer = RecordWriter(MysqlTarget.from_url(SHARED))
    job = uuid.uuid4().hex
    await writer.apply([update(vendor, "legacy", job, 5, "https://cutout/photo.png")])
    await writer.close()
    assert rows(SHARED, vendor) == {
        "legacy": ("https://cutout/photo.png", "completed", job, rows(SHARED, vendor)["legacy"][3])
    }


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
