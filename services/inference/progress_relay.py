"""Progress from a worker thread to the Work stream, held back briefly.

The pipeline reports (stage, percent) from its worker thread; the stream
sends them from the event loop. Reports are held up to `hold_s` before they
are sent, so a job that finishes within that time sends its stages with its
output (`WorkOutput.stages`), in one message instead of one per stage; a
long job's watchers see each stage at most `hold_s` late. A run of reports
within one stage keeps only its latest percent.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

Report = tuple[int, int]  # (stage, percent)


class ProgressRelay:
    def __init__(self, loop: asyncio.AbstractEventLoop, hold_s: float) -> None:
        self._loop = loop
        self._hold_s = hold_s
        self._events: deque[Report | None] = deque()  # None: the work is over
        self._ready = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._due = False
        self.held: list[Report] = []  # not sent yet; after `batches` ends, the output's

    def report(self, stage: int, percent: int) -> None:
        """From any thread."""
        self._loop.call_soon_threadsafe(self._push, (stage, percent))

    def finish(self) -> None:
        """From the event loop, once the work is over (after its last report)."""
        self._push(None)

    def _push(self, event: Report | None) -> None:
        self._events.append(event)
        self._ready.set()

    def _hold_over(self) -> None:
        self._due = True
        self._ready.set()

    async def batches(self) -> AsyncIterator[list[Report]]:
        """Reports to send now, in order, until the work is over."""
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                while self._events:
                    event = self._events.popleft()
                    if event is None:
                        return
                    if self.held and self.held[-1][0] == event[0]:
                        self.held[-1] = event
                    else:
                        self.held.append(event)
                if not self.held:
                    continue
                if self._timer is None:
                    self._timer = self._loop.call_later(self._hold_s, self._hold_over)
                elif self._due:
                    self._timer, self._due = None, False
                    batch, self.held = self.held, []
                    yield batch
        finally:
            if self._timer is not None:
                self._timer.cancel()
