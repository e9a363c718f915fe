"""Jobs in Redis: the only code that reads or changes them, one class per concern.

Every change is one Lua script owned by the class of its concern (rendered
with the prelude in lua.py); reads are plain commands. The store knows
nothing about gRPC servers or nodes. `Store` builds all the parts:

    store.submissions   ENQUEUE: idempotency keys, admission caps
    store.jobs          get, place/ETA, watch (through its WatchHub), page
    store.stats         GetQueueStats and the metrics gauges
    store.claims        fair claim (deficit round robin), configured weights
    store.attempts      progress, renew, complete, fail, retry, reap, promote
    store.cancellation  cancel one job
    store.batches       a batch's progress, watch, cancel
    store.dead_letters  page, requeue, purge
    store.blobs         retention of stored outputs
    store.outbox        deliveries still due after SUCCEEDED
    store.webhooks      webhook deliveries of finished jobs and batches
    store.signals       wake-ups and cancellations for dispatchers
"""

from __future__ import annotations

import redis.asyncio as aioredis

from services.common import vendor_policy
from services.scheduler.keys import Keys
from services.scheduler.store.attempts import Attempts
from services.scheduler.store.batches import Batches
from services.scheduler.store.cancellation import Cancellation
from services.scheduler.store.claims import Claims
from services.scheduler.store.dead_letters import DeadLetters
from services.scheduler.store.jobs import Jobs
from services.scheduler.store.model import (
    Admission,
    Claim,
    Completion,
    Fairness,
    FleetCapacity,
    NewJob,
    Place,
    Retention,
    RetryPolicy,
    ensure_succeeded,
    estimate_wait_ms,
    job_from_fields,
    one_slot,
)
from services.scheduler.store.outbox import Delivery, Outbox
from services.scheduler.store.outcomes import (
    Cancelled,
    Charge,
    Enqueued,
    Fence,
    Requeued,
    Retried,
    Switched,
)
from services.scheduler.store.retention import BlobRetention
from services.scheduler.store.signals import Signal, Signals
from services.scheduler.store.stats import Snapshot, Stats
from services.scheduler.store.submissions import Submissions
from services.scheduler.store.webhooks import Webhooks

__all__ = [
    "Admission",
    "Attempts",
    "Batches",
    "BlobRetention",
    "Cancellation",
    "Cancelled",
    "Charge",
    "Claim",
    "Claims",
    "Completion",
    "DeadLetters",
    "Delivery",
    "Enqueued",
    "Fairness",
    "Fence",
    "FleetCapacity",
    "Jobs",
    "NewJob",
    "Outbox",
    "Place",
    "Requeued",
    "Retention",
    "Retried",
    "RetryPolicy",
    "Signal",
    "Signals",
    "Snapshot",
    "Stats",
    "Store",
    "Submissions",
    "Switched",
    "Webhooks",
    "ensure_succeeded",
    "estimate_wait_ms",
    "job_from_fields",
]


class Store:
    """Every part of the job store, on one Redis and key prefix."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        retention: Retention | None = None,
        retries: RetryPolicy | None = None,
        fairness: Fairness | None = None,
        admission: Admission | None = None,
        fleet_capacity: FleetCapacity = one_slot,
        delivery_lease_ms: int = 60_000,
    ) -> None:
        self.redis = redis
        self.keys = keys
        retention = retention or Retention()
        self.jobs = Jobs(redis, keys, fleet_capacity)
        self.submissions = Submissions(
            redis, keys, retention, admission or Admission(), fleet_capacity
        )
        self.stats = Stats(redis, keys)
        self.claims = Claims(redis, keys, fairness or Fairness())
        self.blobs = BlobRetention(redis, keys, retention)
        self.attempts = Attempts(redis, keys, retention, retries or RetryPolicy(), self.blobs)
        self.cancellation = Cancellation(redis, keys, retention, self.jobs)
        self.batches = Batches(redis, keys, self.cancellation)
        self.dead_letters = DeadLetters(redis, keys, self.jobs)
        self.outbox = Outbox(redis, keys, retention, delivery_lease_ms)
        self.signals = Signals(redis, keys)
        self.webhooks = Webhooks(redis, keys)

    async def start(self) -> None:
        """Before serving: publish the configured weights; adopt vendor policies that an
        older registry kept in its own hash (an upgrade step, a no-op once done)."""
        await self.claims.publish_weights()
        await vendor_policy.adopt_registry_fields(self.redis, self.keys.prefix)
