"""tests/store: the scheduler's and the gateway's stores against real databases: a private
redis-server per test (the redis_server fixture, on a free port) and the shared MariaDB on
127.0.0.1:3306 (tests/support/mariadb.py: SHARED, rows). Nothing else is started: no
service, no other subprocess, no gRPC server.

Shared fixtures (redis_server, standin, photos, ...) are in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.tiers import MARIADB, REDIS, keep_to


@pytest.fixture(scope="module", autouse=True)
def _starts_only_databases() -> Iterator[None]:
    with keep_to("store", REDIS | MARIADB):
        yield
