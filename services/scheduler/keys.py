"""Every Redis key and channel the scheduler uses, in one place.

Each key family is a pattern in PATTERNS, under a configurable prefix
(default "cutout:") so several clusters or test runs can share one Redis.
Python builds names with `Keys`; the Lua scripts get the same patterns as
functions (`key.job(job_id)`, `key.queue(lane, vendor)`, ...) rendered into
their prelude from PATTERNS by services/scheduler/store/lua.py, so the two
cannot drift apart.

Scripts touch keys they compute, so Cutout needs a standalone Redis (with a
replica or Sentinel for failover), not Redis Cluster.

Lanes: `{lane}` is a Lane's value, '' for inference work or 'light:' for light jobs
(services/common/operations.py); each lane has its own queues, ring and
deficits, and the job hash's `lane` field says which lane a job is in.

Owners (services/scheduler/store/): submissions.py writes idempotency, seq,
vendor_jobs, vendors and batch; claims.py ring, ring_members, deficit, turn and
weights; attempts.py leases, delayed, running, counters and eta; dead_letters.py
dead_letters; retention.py blobs; outbox.py deliveries and delivery_tries;
webhooks.py webhook, webhooks_due and webhook_log (queued by lua.py's finish, which
also counts batch_open down);
signals.py listens on the two channels. The job hash, input, events and queues
change only through the scripts of those modules and cancellation.py, each a
documented transition that may touch other families (a dead letter leaves
`running` for `dead_letters`); lua.py holds the helpers they share. jobs.py
and stats.py only read; batches.py reads and cancels through cancellation.py.
vendor_policy is not the scheduler's: it only reads it.
"""

from __future__ import annotations

import string
from typing import Final

from services.common import vendor_policy, webhook_registry
from services.common.operations import Lane

PATTERNS: Final[dict[str, str]] = {
    # HASH: the job record: state, stage, progress, attempt (every start), free_attempts
    # (starts lost to the cluster's own faults, not charged to its retries), vendor, lane,
    # operation (serialised proto), result/error (serialised), times (ms since the epoch).
    "job": "job:{job_id}",
    # STRING: the input image bytes; deleted when the job is done (kept for a dead letter).
    "input": "input:{job_id}",
    # STREAM: every change to the job, as the hash fields it changed (WatchJob replays it);
    # trimmed to about EVENTS_KEPT entries.
    "events": "events:{job_id}",
    # ZSET: the vendor's waiting jobs of one lane; score = (MAX_PRIORITY - priority) * PRIORITY_BAND
    # + seq, so higher priority first, then FIFO.
    "queue": "{lane}queue:{vendor}",
    # LIST: vendors with waiting jobs in the lane, in round-robin order.
    "ring": "{lane}ring",
    # SET: the same vendors, to keep the ring free of duplicates.
    "ring_members": "{lane}ring:members",
    # HASH: vendor -> unused credit (milli-megapixels) of deficit round robin.
    "deficit": "{lane}deficit",
    # HASH: vendor -> 1 while its turn at the head of the ring has begun.
    "turn": "{lane}turn",
    # HASH: vendor -> fairness weight from CUTOUT_VENDOR_WEIGHTS (published at start).
    "weights": "weights",
    # HASH: the vendor's scheduling policy, written by the vendor registry: `weight`
    # (beats `weights`), `max_queued` (beats the cluster default). The interface is
    # services/common/vendor_policy.py; the scheduler only reads it.
    "vendor_policy": vendor_policy.KEY,
    # ZSET: running job id -> lease deadline (ms since the epoch).
    "leases": "leases",
    # ZSET: job id -> when its backoff ends and it rejoins its queue (ms).
    "delayed": "delayed",
    # ZSET: the vendor's dead-lettered job ids -> when dead-lettered (ms).
    "dead_letters": "dlq:{vendor}",
    # SET: the vendor's running job ids.
    "running": "running:{vendor}",
    # ZSET: every job of the vendor -> seq, for listing newest first.
    "vendor_jobs": "jobs:{vendor}",
    # STRING: job id for a vendor's idempotency key; expires after 24 h.
    "idempotency": "idem:{vendor}:{client_key}",
    # SET: the job ids of one batch ("batches/{id}"); expires after the retention period
    # plus a day from its last job's submission.
    "batch": "batch:{vendor}:{batch}",
    # STRING: global submission counter.
    "seq": "seq",
    # SET: every vendor that ever submitted, for global stats.
    "vendors": "vendors",
    # HASH: monotonic counts: attempts, lease_lost, retried (free_retries of them not
    # charged to the job), dead_lettered, succeeded, failed.
    "counters": "counters:{vendor}",
    # HASH: run_ms, light:run_ms: moving average of attempt run time per lane, for ETAs.
    "eta": "eta",
    # ZSET: stored result URI -> when it is to be deleted (ms): its job's expiry, or now
    # for a copy no job points at any more; the sweeper deletes the blob, then the entry.
    "blobs": "blobs",
    # ZSET: succeeded job id -> when its delivery is next due (ms): the upload to a remote
    # store that failed inline, and/or its record update.
    "deliveries": "deliveries",
    # HASH: job id -> failed delivery tries so far (for backoff).
    "delivery_tries": "delivery_tries",
    # HASH / HASH: a vendor's webhook endpoint and its signing secrets, written by the
    # vendor registry: services/common/webhook_registry.py. The scheduler only reads them.
    "webhook_endpoint": webhook_registry.ENDPOINT_KEY,
    "webhook_secrets": webhook_registry.SECRETS_KEY,
    # HASH: one webhook delivery (a job's or a batch's end): vendor, event, subject
    # (jobs/ID or batches/ID), url, state, attempts, last status/error, times; kept
    # WEBHOOK_KEPT_S after it ends.
    "webhook": "webhook:{message_id}",
    # ZSET: pending webhook delivery id -> when it is next due (ms); leased like deliveries.
    "webhooks_due": "webhooks:due",
    # ZSET: the vendor's webhook delivery ids -> created (ms), for `cutout webhooks list`.
    "webhook_log": "webhooks:log:{vendor}",
    # HASH: "{vendor}/{batch}" -> the batch's jobs not yet finished; at 0 its
    # batch.completed webhook is queued.
    "batch_open": "batch_open",
    # PUBSUB: published on every enqueue and requeue: dispatchers wake up.
    "wake_channel": "wake",
    # PUBSUB: job id of a cancelled running job: its dispatcher cancels the node call.
    "cancel_channel": "cancel",
}

DEFAULT_PREFIX = "cutout:"
EVENTS_KEPT = 256  # per job: a job has ~15 events, requeued dead letters more


def fields_of(pattern: str) -> list[str]:
    """The placeholders of a pattern, in order: the Lua builder's parameters."""
    return [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]


class Keys:
    """Key names under one prefix, built from PATTERNS."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.vendors = self.of("vendors")
        self.weights = self.of("weights")
        self.eta = self.of("eta")
        self.blobs = self.of("blobs")
        self.deliveries = self.of("deliveries")
        self.delivery_tries = self.of("delivery_tries")
        self.webhooks_due = self.of("webhooks_due")
        self.batch_open = self.of("batch_open")
        self.wake_channel = self.of("wake_channel")
        self.cancel_channel = self.of("cancel_channel")

    def of(self, family: str, **fields: str) -> str:
        return self.prefix + PATTERNS[family].format(**fields)

    def webhook(self, message_id: str) -> str:
        return self.of("webhook", message_id=message_id)

    def webhook_log(self, vendor: str) -> str:
        return self.of("webhook_log", vendor=vendor)

    def job(self, job_id: str) -> str:
        return self.of("job", job_id=job_id)

    def input(self, job_id: str) -> str:
        return self.of("input", job_id=job_id)

    def events(self, job_id: str) -> str:
        return self.of("events", job_id=job_id)

    def queue(self, vendor: str, lane: Lane = Lane.HEAVY) -> str:
        return self.of("queue", lane=lane, vendor=vendor)

    def ring_members(self, lane: Lane) -> str:
        return self.of("ring_members", lane=lane)

    def running(self, vendor: str) -> str:
        return self.of("running", vendor=vendor)

    def vendor_jobs(self, vendor: str) -> str:
        return self.of("vendor_jobs", vendor=vendor)

    def counters(self, vendor: str) -> str:
        return self.of("counters", vendor=vendor)

    def batch(self, vendor: str, batch: str) -> str:
        return self.of("batch", vendor=vendor, batch=batch)

    def dead_letters(self, vendor: str) -> str:
        return self.of("dead_letters", vendor=vendor)


# Fairness cost of a job in milli-megapixels, with a floor so that a flood of
# tiny images still pays for the per-job work they cause.
MIN_COST = 50


def job_cost(input_pixels: int) -> int:
    return max(MIN_COST, -(-input_pixels // 1000))


# Queue score layout: priority band (operations.MAX_PRIORITY - priority) above a
# 40-bit sequence number.
PRIORITY_BAND = 1 << 40
