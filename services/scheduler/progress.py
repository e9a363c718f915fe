"""Throttled progress: a node may report many times a second, Redis hears at most a few.

Each write is a Lua call and a stream entry that every watcher reads, so a
fast job reporting five stages in a few milliseconds would cost more than
its inference. The throttle writes at once when the last write is older than
the interval, otherwise keeps only the latest report and writes it when the
interval has passed (unless the attempt ends first: its final state
supersedes it). Watchers therefore see every stage that lasts longer than the
interval, and progress never goes backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

Write = Callable[[int, int], Awaitable[bool]]  # (stage, percent) -> attempt still ours


class ProgressThrottle:
    def __init__(self, write: Write, interval_s: float) -> None:
        self._write = write
        self._interval = interval_s
        self._last = time.monotonic()  # the claim itself recorded RUNNING
        self._pending: tuple[int, int] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self.alive = True

    async def report(self, stage: int, percent: int) -> bool:
        """Record a report; False once the attempt is known to be fenced off."""
        if not self.alive:
            return False
        wait = self._last + self._interval - time.monotonic()
        if wait <= 0 and self._flusher is None:
            await self._send(stage, percent)
        else:
            self._pending = (stage, percent)
            if self._flusher is None:
                self._flusher = asyncio.create_task(self._flush_after(max(0.0, wait)))
        return self.alive

    async def _flush_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._flusher = None
        if self._pending is not None and self.alive:
            stage, percent = self._pending
            self._pending = None
            await self._send(stage, percent)

    async def _send(self, stage: int, percent: int) -> None:
        self._last = time.monotonic()
        self.alive = await self._write(stage, percent)

    async def close(self) -> None:
        """The attempt is over: drop what has not been written."""
        self._pending = None
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
