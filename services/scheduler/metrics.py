"""The scheduler's Prometheus metrics.

Counters and histograms count what this replica did (sum them across
replicas). Gauges of queue depth, jobs by state and pending deliveries are
read from Redis by `QueueGauges` and describe the whole cluster, so every
replica reports the same value (aggregate them with max, not sum). The
store counts them (store/stats.py); this module only publishes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram

from services.scheduler.nodes import NodePool

if TYPE_CHECKING:  # the store counts with these metrics: import it only for types
    from services.scheduler.store.stats import Stats

log = logging.getLogger(__name__)

_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_RUN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

QUEUE_DEPTH = Gauge(
    "cutout_queue_depth", "Jobs waiting to run, by vendor and priority", ["vendor", "priority"]
)
JOBS = Gauge(
    "cutout_jobs",
    "Unfinished jobs in the cluster by state: queued, running, dead_lettered",
    ["state"],
)
JOBS_FINISHED = Counter(
    "cutout_jobs_finished_total",
    "Jobs this scheduler finished, by outcome: succeeded, failed (incl. dead-lettered)",
    ["outcome"],
)
JOBS_ENQUEUED = Counter(
    "cutout_jobs_enqueued_total",
    "Submissions stored: queued as new jobs, or deduplicated to an existing one",
    ["outcome"],
)
ATTEMPTS = Counter("cutout_attempts_total", "Attempts started on nodes")
RETRIES = Counter("cutout_retries_total", "Failed attempts put back to be tried again")
DEAD_LETTERS = Counter("cutout_dead_letters_total", "Jobs dead-lettered after their last retry")
LEASE_LOSSES = Counter(
    "cutout_lease_losses_total",
    "Attempts whose lease ran out (their scheduler stopped, or lost Redis for a lease)",
)
ADMISSION_REFUSALS = Counter(
    "cutout_admission_refusals_total",
    "Submissions shed because a queue cap was reached, by scope: vendor, cluster",
    ["scope"],
)
QUEUE_WAIT = Histogram(
    "cutout_queue_wait_seconds",
    "From submission to the start of the job's first attempt",
    buckets=_WAIT_BUCKETS,
)
RUN = Histogram(
    "cutout_run_seconds",
    "Duration of one attempt on a node, including storing the output",
    buckets=_RUN_BUCKETS,
)
END_TO_END = Histogram(
    "cutout_end_to_end_seconds",
    "From submission to SUCCEEDED",
    buckets=_WAIT_BUCKETS,
)
NODE_IN_FLIGHT = Gauge("cutout_node_in_flight", "Jobs running on each node", ["node"])
NODE_CAPACITY = Gauge("cutout_node_capacity", "Jobs each node can run at once", ["node"])
HEALTHY_NODES = Gauge("cutout_healthy_nodes", "Nodes that pass health checks and are not draining")
STORAGE_ERRORS = Counter(
    "cutout_storage_errors_total",
    "Failed storage calls, by backend (local, cloudinary) and operation (put, delete)",
    ["backend", "operation"],
)
RECORD_UPDATES = Counter(
    "cutout_record_updates_total",
    "data_records updates applied for succeeded jobs (a repeat is applied but changes nothing)",
)
RECORD_UPDATE_ERRORS = Counter(
    "cutout_record_update_errors_total",
    "Record update rounds that failed (retried later; nothing is dropped)",
)
DELIVERIES_PENDING = Gauge(
    "cutout_deliveries_pending", "Succeeded jobs whose upload or record update is still due"
)

WEBHOOK_ATTEMPTS = Counter(
    "cutout_webhook_attempts_total",
    "Webhook delivery attempts by vendor and outcome: delivered (2xx), retry (another "
    "attempt is due), failed (retry window over), disabled (410: the endpoint is disabled)",
    ["vendor", "outcome"],
)
WEBHOOKS_PENDING = Gauge("cutout_webhooks_pending", "Webhook deliveries not made yet")


class QueueGauges:
    """Refreshes the cluster-wide gauges from the store's counts and the node pool."""

    def __init__(self, stats: Stats, pool: NodePool) -> None:
        self.stats = stats
        self.pool = pool

    async def refresh(self) -> None:
        snapshot = await self.stats.snapshot()
        for (vendor, priority), depth in snapshot.depth.items():
            QUEUE_DEPTH.labels(vendor, str(priority)).set(depth)
        JOBS.labels("queued").set(snapshot.queued)
        JOBS.labels("running").set(snapshot.running)
        JOBS.labels("dead_lettered").set(snapshot.dead_lettered)
        DELIVERIES_PENDING.set(snapshot.deliveries_pending)
        healthy = 0
        for node in self.pool.nodes:
            NODE_IN_FLIGHT.labels(node.address).set(node.in_flight)
            NODE_CAPACITY.labels(node.address).set(node.capacity if node.healthy else 0)
            healthy += node.healthy and not node.draining
        HEALTHY_NODES.set(healthy)

    async def refresh_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.refresh()
            except aioredis.RedisError as exc:
                log.warning("cannot read queue gauges", extra={"error": str(exc)})
            await asyncio.sleep(interval_s)
