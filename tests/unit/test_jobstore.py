"""The scheduler's queue rules that need no Redis: the wait estimate. The rest, on a private
redis-server: tests/store/test_jobstore.py."""

from __future__ import annotations

from services.scheduler.store import (
    estimate_wait_ms,
)


def test_wait_estimate_shares_the_fleet_among_waiting_vendors() -> None:
    assert estimate_wait_ms(position=8, capacity=8, active_vendors=1, run_ms=100) == 100
    assert estimate_wait_ms(position=8, capacity=8, active_vendors=4, run_ms=100) == 400
    assert estimate_wait_ms(position=1, capacity=2, active_vendors=4, run_ms=100) == 100
