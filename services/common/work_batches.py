"""Several Work-stream messages in one write, both ways (WorkRequest.more, WorkResponse.more).

In grpc's Python layer a message written on a stream costs about what a small
call does (py-spy at 8 nodes x 4 slots: a fifth of the scheduler's CPU was the
stream write, one per job). What one side has ready at the same moment (jobs
claimed together; outputs, ends and credits of jobs that finished together)
therefore goes as one message. Nothing waits to fill a batch: a lone message
goes at once, as before.

A scheduler always asks for batched replies with BATCHES_METADATA when it opens
the stream, and always writes batches; a node still answers one message per write
to a caller that does not ask (a test or benchmark driving it directly).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Asks the node to put what it has ready at once into one WorkResponse (its `more`).
BATCHES_METADATA = ("x-cutout-work-batches", "1")
MAX_BATCH = 64  # the most messages one write carries
# The most payload bytes (images, outputs) a batch gathers: far below either side's
# message limit (32 MiB by default), so batching never makes a message too large;
# a single message over it still goes, alone, as it would without batches.
MAX_BATCH_BYTES = 4 << 20


def take_ready(
    first: T, queue: asyncio.Queue[T], size: Callable[[T], int], most: int = MAX_BATCH
) -> tuple[list[T], list[T]]:
    """first, then what else the queue holds now, up to `most` messages and
    MAX_BATCH_BYTES of payload; and the message taken that did not fit, if any
    (a list of one: it goes first in the next batch)."""
    taken, total = [first], size(first)
    while len(taken) < most and not queue.empty():
        following = queue.get_nowait()
        total += size(following)
        if total > MAX_BATCH_BYTES:
            return taken, [following]
        taken.append(following)
    return taken, []
