"""Hardening, the gateway's part that needs no process: the wait for a URL fetch slot is
inside the fetch deadline.

The rest: tests/store/test_hardening.py and tests/cluster/test_hardening.py.
"""

from __future__ import annotations

import time

import grpc
import pytest

from services.common.errors import CutoutError
from services.common.fetch import FetchSlots


async def test_the_fetch_deadline_includes_the_wait_for_a_slot() -> None:
    slots = FetchSlots(per_vendor=1, total=1)
    async with slots.vendor("a"), slots.shared(1.0):
        started = time.monotonic()
        # Another vendor waits for the gateway's one slot, but only as long as its deadline.
        with pytest.raises(CutoutError) as refused:
            async with slots.vendor("b"), slots.shared(0.3):
                pass
        assert 0.25 < time.monotonic() - started < 2
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "CUTOUT_URL_FETCHES" in refused.value.message
        assert refused.value.retry_after_s
        # The same vendor is refused at once: its one slot is taken.
        with pytest.raises(CutoutError, match="CUTOUT_URL_FETCHES_PER_VENDOR"):
            async with slots.vendor("a"):
                pass
    async with slots.vendor("b"), slots.shared(0.3):
        pass  # free again
