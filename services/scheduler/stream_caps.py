"""Caps on open watch streams (WatchJob, WatchBatch) per vendor and per scheduler.

A stream costs the scheduler little now (watch_hub.py reads every watched job
on one connection), but each is still a gRPC call, a buffer and a task: a
vendor that opens thousands must not take the memory and CPU the others
need. Counted per scheduler process; with several replicas behind a load
balancer a vendor may hold up to the cap on each.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from services.common.errors import CutoutError

RETRY_AFTER_S = 5.0  # a stream ends when its job does; by then some have closed


class StreamCaps:
    def __init__(self, per_vendor: int, total: int) -> None:
        self.per_vendor = per_vendor
        self.total = total
        self._open: Counter[str] = Counter()

    @property
    def open(self) -> int:
        return sum(self._open.values())

    def of(self, vendor: str) -> int:
        return self._open[vendor]

    def acquire(self, vendor: str) -> Callable[[], None]:
        """Count one open stream of the vendor; returns its release (idempotent).

        RESOURCE_EXHAUSTED when the vendor or the scheduler is at its cap.
        """
        if self._open[vendor] >= self.per_vendor:
            raise _refusal(
                vendor,
                f"vendor {vendor} already has {self.per_vendor} watch streams open on this "
                f"scheduler, the most CUTOUT_WATCH_STREAMS_PER_VENDOR allows",
                f"watch streams: {self.per_vendor} per vendor",
            )
        if self.open >= self.total:
            raise _refusal(
                vendor,
                f"this scheduler already serves {self.total} watch streams, the most "
                "CUTOUT_WATCH_STREAMS allows",
                f"watch streams: {self.total} per scheduler",
            )
        self._open[vendor] += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self._open[vendor] -= 1
            if not self._open[vendor]:
                del self._open[vendor]

        return release

    @contextlib.contextmanager
    def hold(self, vendor: str, context: Any = None) -> Iterator[None]:
        """One open stream of the vendor for as long as the block runs, and no longer than
        the RPC: with `context`, the count drops when the call ends even if the streaming
        generator stays suspended at a `yield` (a caller that hung up mid-write) until it
        is garbage-collected."""
        release = self.acquire(vendor)
        if context is not None:
            context.add_done_callback(lambda _: release())
        try:
            yield
        finally:
            release()


def _refusal(vendor: str, why: str, quota: str) -> CutoutError:
    return CutoutError(
        f"{why}; close some (a watch ends when its job is done), or poll with GetJob or "
        "ListJobs instead",
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        retry_after_s=RETRY_AFTER_S,
        quota_violations=[(f"vendor:{vendor}", quota)],
    )
