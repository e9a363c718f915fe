"""A lane's slots on a node, and the few jobs a Work stream may have waiting for one.

A job on a Work stream used to reach a node only after a slot there had freed:
the node's credit went to the scheduler, which claimed a job in Redis and sent
it back. On a 2-core box that round trip left slots idle about a fifth of the
time with 50 ms jobs (bench/scale.py: utilisation 0.81 at 8 nodes x 4 slots);
on a GPU, where a job takes a few milliseconds, it would be most of the time.
So each stream is granted `prefetch` credits beyond the slots (per lane): that
many jobs may wait here, first come first served, and a freed slot passes
straight to the first of them. A job beyond that (slots and waiting room
full) is refused.
"""

from __future__ import annotations

import asyncio
from collections import deque

from services.common.errors import ResourceExhausted


class Full(ResourceExhausted):
    """No free slot, and no room to wait for one: refused before any work (the scheduler
    puts the job back in its queue at once, without counting the attempt)."""


class Slots:
    def __init__(self, capacity: int, prefetch: int = 0, name: str = "heavy") -> None:
        self.capacity = capacity
        self.prefetch = prefetch  # jobs that may wait for a slot, beyond capacity
        self.name = name  # the lane's, in a refusal: "node is full (4 heavy jobs)"
        self.in_flight = 0  # slots taken
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.paused = False  # no slot is handed out (the node recycles its sessions)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _free(self) -> bool:
        return not self.paused and self.in_flight < self.capacity and not self._waiters

    def take_now(self) -> None:
        """Take a free slot; Full when there is none."""
        if not self._free():
            raise Full(f"node is full ({self.capacity} {self.name} jobs)")
        self.in_flight += 1

    async def take(self) -> None:
        """Take a slot, waiting for one (in turn) while fewer than `prefetch` jobs wait;
        Full when the waiting room is full too. Cancelled while waiting: nothing taken."""
        if self._free():
            self.in_flight += 1
            return
        if self.waiting >= self.prefetch:
            raise Full(f"node is full ({self.capacity} {self.name} jobs, {self.waiting} waiting)")
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give_back()  # handed a slot as it was cancelled: pass it on
            elif turn in self._waiters:
                self._waiters.remove(turn)
            raise

    def give_back(self) -> None:
        """Free a slot: it goes to the first job waiting, if any."""
        self.in_flight -= 1
        self.hand_out()

    def hand_out(self) -> None:
        """Give free slots to waiting jobs (after a pause, or as one frees)."""
        while not self.paused and self._waiters and self.in_flight < self.capacity:
            turn = self._waiters.popleft()
            if not turn.done():
                self.in_flight += 1
                turn.set_result(None)
