"""Throttled progress: a node may report many times a second, Redis hears fewer.

Each write is a Lua call and one stream entry per stage that every watcher
reads. Reports are collected and written together at most once per interval:
every stage still lands, in order (a run of reports within one stage keeps
only its latest percent), and progress never goes backwards. What is still
pending when the attempt finishes goes out with its completion, in the same
round trip (`take`), so a job that runs in milliseconds costs one write, not
one per stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

# [(stage, percent), ...] in order -> the attempt still holds its job
Write = Callable[[list[tuple[int, int]]], Awaitable[bool]]


class ProgressThrottle:
    def __init__(self, write: Write, interval_s: float) -> None:
        self._write = write
        self._interval = interval_s
        self._last = time.monotonic()  # the claim itself recorded RUNNING
        self._pending: list[tuple[int, int]] = []
        self._writing = asyncio.Lock()  # writes land in the order they were decided
        self._flusher: asyncio.Task[None] | None = None
        self.alive = True

    async def report(self, stage: int, percent: int) -> bool:
        """Record a report; False once the attempt is known to be fenced off."""
        if not self.alive:
            return False
        self.add(stage, percent)
        wait = self._last + self._interval - time.monotonic()
        if wait <= 0 and self._flusher is None:
            await self._send()
        elif self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_after(wait))
        return self.alive

    def add(self, stage: int, percent: int) -> None:
        """Record a report that the attempt's end will write (`take`), arming no timer."""
        if self._pending and self._pending[-1][0] == stage:
            self._pending[-1] = (stage, percent)
        else:
            self._pending.append((stage, percent))

    def restore(self, updates: list[tuple[int, int]]) -> None:
        """Put back reports whose write failed (Redis restarting), ahead of newer ones."""
        pending, self._pending = self._pending, []
        for stage, percent in [*updates, *pending]:
            self.add(stage, percent)

    def take(self) -> list[tuple[int, int]]:
        """The reports not written yet, for the caller to write with the attempt's end."""
        pending, self._pending = self._pending, []
        return pending

    async def _flush_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._flusher = None
        await self._send()

    async def _send(self) -> None:
        self._last = time.monotonic()
        async with self._writing:
            updates = self.take()
            if updates and self.alive:
                self.alive = await self._write(updates)

    async def close(self) -> None:
        """The attempt is over: drop what has not been written."""
        self._pending = []
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
