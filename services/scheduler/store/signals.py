"""What the scripts announce: new work (`wake_channel`), cancelled running jobs (`cancel_channel`).

Redis pub/sub: a hint, not a record. A dispatcher that misses one still polls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.scheduler.keys import Keys


@dataclass(frozen=True)
class Signal:
    cancelled: str = ""  # the job id of a cancelled running job; '' for new work


class Signals:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def listen(self) -> AsyncIterator[Signal]:
        """Every signal from now on, until the connection is lost (RedisError)."""
        cancel_channel = self.keys.cancel_channel.encode()
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.keys.wake_channel, self.keys.cancel_channel)
            async for message in pubsub.listen():
                if message["type"] != "message":
                    continue
                if message["channel"] == cancel_channel:
                    yield Signal(cancelled=message["data"].decode())
                else:
                    yield Signal()
        finally:
            await pubsub.aclose()
