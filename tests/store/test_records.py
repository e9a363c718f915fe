"""Vendors' data_records in the shared MariaDB on 127.0.0.1:3306 (database `test`): a job
applies once, an older job never overwrites a newer one, rows of the old system are updated
in place."""

from __future__ import annotations

import uuid

import pymysql

from services.scheduler.migrate import migrate
from services.scheduler.records import (
    MysqlTarget,
    RecordWriter,
)
from tests.support.mariadb import SHARED, rows, update


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
