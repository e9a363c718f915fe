"""Counts across jobs: GetQueueStats for a vendor or the cluster, and the metrics gauges.

Reads only (queues, running sets, counters, dead letters, the outbox).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import redis.asyncio as aioredis

from cutout.v1 import jobs_pb2
from services.common.operations import LANES, MAX_PRIORITY, PRIORITIES
from services.scheduler.keys import PRIORITY_BAND, Keys


@dataclass
class Snapshot:
    """What the cluster-wide gauges show (services/scheduler/metrics.py)."""

    depth: dict[tuple[str, int], int] = field(default_factory=dict)  # (vendor, priority) -> queued
    queued: int = 0
    running: int = 0
    dead_lettered: int = 0
    deliveries_pending: int = 0


class Stats:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def vendors(self) -> list[str]:
        """Every vendor that ever submitted, sorted."""
        members = cast(set[bytes], await self.redis.smembers(self.keys.vendors))
        return sorted(v.decode() for v in members)

    def _depths(self, pipe: aioredis.client.Pipeline, vendor: str) -> None:
        """Queue ZCOUNTs, by priority (highest first) then lane."""
        for priority in reversed(PRIORITIES):
            low = (MAX_PRIORITY - priority) * PRIORITY_BAND
            for lane in LANES:
                pipe.zcount(self.keys.queue(vendor, lane), low, low + PRIORITY_BAND - 1)

    async def queue(self, vendor: str) -> jobs_pb2.QueueStats:
        """The vendor's counts, or the whole cluster's when vendor is ''."""
        vendors = [vendor] if vendor else await self.vendors()
        stats = jobs_pb2.QueueStats()
        by_priority = dict.fromkeys(PRIORITIES, 0)
        async with self.redis.pipeline(transaction=False) as pipe:
            for v in vendors:
                pipe.scard(self.keys.running(v))
                pipe.hgetall(self.keys.counters(v))
                self._depths(pipe, v)
            rows = await pipe.execute()
        per_vendor = 2 + len(PRIORITIES) * len(LANES)
        for i in range(len(vendors)):
            chunk = rows[i * per_vendor : (i + 1) * per_vendor]
            stats.running += int(chunk[0])
            counts = {k.decode(): int(n) for k, n in chunk[1].items()}
            stats.attempts_started += counts.get("attempts", 0)
            stats.lease_losses += counts.get("lease_lost", 0)
            stats.retries += counts.get("retried", 0)
            stats.dead_lettered += counts.get("dead_lettered", 0)
            stats.succeeded += counts.get("succeeded", 0)
            stats.failed += counts.get("failed", 0)
            for n, priority in enumerate(reversed(PRIORITIES)):
                lanes = chunk[2 + n * len(LANES) : 2 + (n + 1) * len(LANES)]
                by_priority[priority] += sum(int(c) for c in lanes)
        stats.queued = sum(by_priority.values())
        for priority in reversed(PRIORITIES):
            if by_priority[priority]:
                stats.by_priority.add(priority=priority, queued=by_priority[priority])
        return stats

    async def snapshot(self) -> Snapshot:
        """Queue depths by vendor and priority, jobs by state, deliveries due: one round trip."""
        vendors = await self.vendors()
        async with self.redis.pipeline(transaction=False) as pipe:
            for vendor in vendors:
                self._depths(pipe, vendor)
                pipe.scard(self.keys.running(vendor))
                pipe.zcard(self.keys.dead_letters(vendor))
            pipe.zcard(self.keys.deliveries)
            counts = [int(c) for c in await pipe.execute()]
        depths = len(PRIORITIES) * len(LANES)
        per_vendor = depths + 2
        out = Snapshot(deliveries_pending=counts[-1])
        for i, vendor in enumerate(vendors):
            row = counts[i * per_vendor : (i + 1) * per_vendor]
            for n, priority in enumerate(reversed(PRIORITIES)):
                out.depth[vendor, priority] = sum(row[n * len(LANES) : (n + 1) * len(LANES)])
            out.queued += sum(row[:depths])
            out.running += row[-2]
            out.dead_lettered += row[-1]
        return out
