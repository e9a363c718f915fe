"""Vendors' data_records: statements chunked under the server's max_allowed_packet. Against
MariaDB: tests/store/test_records.py and tests/cluster/test_records.py."""

from __future__ import annotations

import uuid

import pytest

from services.scheduler.records import (
    PACKET_MARGIN,
    statements,
)
from tests.support.mariadb import update


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
