"""How a node relays progress: held briefly, every stage kept, nothing sent twice."""

from __future__ import annotations

import asyncio
import threading
import time

from services.inference.progress_relay import ProgressRelay


async def collect(relay: ProgressRelay) -> list[list[tuple[int, int]]]:
    return [batch async for batch in relay.batches()]


async def test_a_quick_job_sends_no_progress_message_and_keeps_every_stage() -> None:
    relay = ProgressRelay(asyncio.get_running_loop(), hold_s=5.0)
    sending = asyncio.create_task(collect(relay))
    for stage, percent in [(2, 5), (3, 20), (3, 60), (4, 75), (5, 85), (5, 90)]:
        relay.report(stage, percent)
    await asyncio.sleep(0.05)
    relay.finish()
    assert await asyncio.wait_for(sending, 1) == []
    # What goes out with the output: each stage once, at its latest percent.
    assert relay.held == [(2, 5), (3, 60), (4, 75), (5, 90)]


async def test_a_long_job_sends_its_stages_after_the_hold_and_loses_none() -> None:
    loop = asyncio.get_running_loop()
    relay = ProgressRelay(loop, hold_s=0.05)
    sent: list[tuple[float, list[tuple[int, int]]]] = []
    started = loop.time()

    async def send() -> None:
        async for batch in relay.batches():
            sent.append((loop.time() - started, batch))

    sending = asyncio.create_task(send())

    def worker() -> None:  # the pipeline reports from its own thread
        for stage, percent in [(2, 5), (3, 20), (4, 75), (5, 85)]:
            relay.report(stage, percent)
            time.sleep(0.12)

    thread = threading.Thread(target=worker)
    thread.start()
    await asyncio.to_thread(thread.join)
    worker_done = loop.time() - started
    relay.finish()
    await asyncio.wait_for(sending, 1)
    # A slow job's watchers are not kept waiting for its end.
    assert sent and sent[0][0] < worker_done, (sent, worker_done)
    assert all(at >= 0.045 for at, _ in sent)  # never before the hold
    everything = [r for _, batch in sent for r in batch] + relay.held
    assert everything == [(2, 5), (3, 20), (4, 75), (5, 85)]
