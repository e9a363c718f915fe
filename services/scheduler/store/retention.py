"""Retention of stored outputs: the `blobs` set, stored URI -> when to delete it (ms).

An output is registered when it is written, before its job completes, with
the job's own deadline, so an attempt that loses its job cannot leave a file
behind. A delivery that replaces a job's result moves the entry to the new
URI and makes the old copy due at once (outbox.SWITCH_RESULT). Each
scheduler's sweeper deletes due blobs, then forgets them: a crash in between
repeats a delete rather than leaking a file.
"""

from __future__ import annotations

import time
from typing import cast

import redis.asyncio as aioredis

from services.scheduler.keys import Keys
from services.scheduler.store.model import Retention


class BlobRetention:
    def __init__(self, redis: aioredis.Redis, keys: Keys, retention: Retention) -> None:
        self.redis = redis
        self.keys = keys
        self.retention = retention

    def register(self, pipe: aioredis.client.Pipeline, uri: str) -> None:
        """Queue on pipe: keep uri as long as a job finished now stays readable."""
        deadline = int((time.time() + self.retention.finished_s) * 1000)
        pipe.zadd(self.keys.blobs, {uri: deadline})

    async def expired(self, limit: int = 100) -> list[str]:
        """URIs whose deadline has passed, oldest first: delete each, then forget it."""
        due = await self.redis.zrangebyscore(
            self.keys.blobs, "-inf", int(time.time() * 1000), start=0, num=limit
        )
        return [b.decode() for b in cast(list[bytes], due)]

    async def forget(self, uris: list[str]) -> None:
        if uris:
            await self.redis.zrem(self.keys.blobs, *uris)

    async def deadline_ms(self, uri: str) -> int | None:
        """When uri is due for deletion, or None when it is not kept (or already swept)."""
        score = await self.redis.zscore(self.keys.blobs, uri)
        return None if score is None else int(score)
