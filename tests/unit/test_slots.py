"""A node lane's slots and its waiting room (prefetch), without a network."""

from __future__ import annotations

import asyncio

import pytest

from services.inference.slots import Full, Slots


async def test_waiting_jobs_get_freed_slots_in_turn_and_no_more_wait_than_prefetch() -> None:
    slots = Slots(capacity=2, prefetch=2)
    await slots.take()
    await slots.take()
    order: list[str] = []

    async def job(name: str) -> None:
        await slots.take()
        order.append(name)

    first = asyncio.create_task(job("first"))
    second = asyncio.create_task(job("second"))
    await asyncio.sleep(0)
    assert (slots.in_flight, slots.waiting) == (2, 2)
    with pytest.raises(Full):  # the waiting room is full too
        await slots.take()
    with pytest.raises(Full):  # take_now never waits
        slots.take_now()
    slots.give_back()  # the freed slot passes straight to the first in line
    await first
    assert order == ["first"] and (slots.in_flight, slots.waiting) == (2, 1)
    slots.give_back()
    await second
    assert order == ["first", "second"] and (slots.in_flight, slots.waiting) == (2, 0)


async def test_a_job_cancelled_while_waiting_leaves_no_slot_taken() -> None:
    slots = Slots(capacity=1, prefetch=2)
    slots.take_now()
    gone = asyncio.create_task(slots.take())
    kept = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert slots.waiting == 1
    slots.give_back()
    await kept  # the cancelled one's turn went to the next in line
    assert (slots.in_flight, slots.waiting) == (1, 0)
    # Handed a slot in the same moment it was cancelled: the slot is passed on, not lost.
    late = asyncio.create_task(slots.take())
    after = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.give_back()  # resolves late's turn...
    late.cancel()  # ...before late runs again
    await asyncio.gather(late, return_exceptions=True)
    await after
    assert (slots.in_flight, slots.waiting) == (1, 0)


async def test_no_slot_is_handed_out_while_paused() -> None:
    """A node rebuilding its model sessions takes no job until it is done."""
    slots = Slots(capacity=1, prefetch=1)
    slots.take_now()
    slots.paused = True
    waiter = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.give_back()
    await asyncio.sleep(0)
    assert not waiter.done() and slots.in_flight == 0
    slots.paused = False
    slots.hand_out()
    await waiter
    assert (slots.in_flight, slots.waiting) == (1, 0)


def test_without_prefetch_nothing_waits() -> None:
    slots = Slots(capacity=1)

    async def run() -> None:
        await slots.take()
        with pytest.raises(Full):
            await slots.take()

    asyncio.run(run())
