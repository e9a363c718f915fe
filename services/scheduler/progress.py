"""Throttled progress: a node may report many times a second, Redis hears fewer.

Each write is a Lua call and a stream entry that every watcher reads. A new
stage is always written at once (watchers see every stage of the pipeline);
reports within one stage are written at once when the last write is older
than the interval, otherwise only the latest is kept and written when the
interval has passed (unless the attempt ends first: its final state
supersedes it). Progress never goes backwards.
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
        self._stage = -1
        self._writing = asyncio.Lock()  # writes land in the order they were decided
        self._flusher: asyncio.Task[None] | None = None
        self.alive = True

    async def report(self, stage: int, percent: int) -> bool:
        """Record a report; False once the attempt is known to be fenced off."""
        if not self.alive:
            return False
        wait = self._last + self._interval - time.monotonic()
        if stage != self._stage:
            self._pending = None  # superseded by this report
            await self._send(stage, percent)
        elif wait <= 0 and self._flusher is None:
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
        self._stage = stage
        async with self._writing:
            if self.alive:
                self.alive = await self._write(stage, percent)

    async def close(self) -> None:
        """The attempt is over: drop what has not been written."""
        self._pending = None
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
