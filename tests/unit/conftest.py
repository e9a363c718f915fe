"""tests/unit: functions and classes in this process. No process is started (no
redis-server, no service, no subprocess at all) and no gRPC server; a stand-in written in
Python (an HTTP server in a thread of this process) may listen on loopback.

Shared fixtures (tiny_model_dir, real_model_dir, photos, standin) are in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.tiers import keep_to


@pytest.fixture(scope="module", autouse=True)
def _starts_nothing() -> Iterator[None]:
    with keep_to("unit"):
        yield
