"""Waiting on a condition instead of sleeping for a guess."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def until(
    condition: Callable[[], T | Awaitable[T]],
    what: str,
    timeout_s: float = 30.0,
    every_s: float = 0.05,
) -> T:
    """Poll condition() (a function or a coroutine function) until it returns something true,
    and return that; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = condition()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(every_s)
