"""Every Redis key and channel the scheduler uses, in one place.

All keys start with a configurable prefix (default "cutout:") so several
clusters or test runs can share one Redis. The Lua scripts in scripts.py
build the same names from the prefix; keep the two in step.

Scripts touch keys they compute, so Cutout needs a standalone Redis (with a
replica or Sentinel for failover), not Redis Cluster.
"""

from __future__ import annotations

DEFAULT_PREFIX = "cutout:"

# job:{id}          HASH   the job record: state, stage, progress, attempt, vendor,
#                          operation (serialised proto), result/error (serialised), times.
# input:{id}        STRING the input image bytes; deleted when the job is done.
# events:{id}       STREAM every change to the job, as the hash fields it changed.
# queue:{vendor}    ZSET   the vendor's waiting jobs; score = (9 - priority) * 2^40 + seq,
#                          so higher priority first, then FIFO.
# ring              LIST   vendors with waiting jobs, in round-robin order.
# ring:members      SET    the same vendors, to keep the ring free of duplicates.
# deficit           HASH   vendor -> unused credit (milli-megapixels) of deficit round robin.
# turn              HASH   vendor -> 1 while its turn at the head of the ring has begun.
# light:queue:{v}, light:ring, light:ring:members, light:deficit, light:turn
#                          the same five for the light lane (transforms, ID/square crops),
#                          which has its own round robin and never waits behind inference.
#                          The job hash's `lane` field says which lane a job is in.
# weights           HASH   vendor -> fairness weight (from CUTOUT_VENDOR_WEIGHTS; default 1).
# vendor:{id}       HASH   the vendor registry (services/gateway/vendors.py, `cutout vendors`):
#                          CLAIM reads `weight` (beats `weights`), ENQUEUE `max_queued`.
# leases            ZSET   running job id -> lease deadline (ms since the epoch).
# delayed           ZSET   job id -> when its backoff ends and it rejoins its queue (ms).
# dlq:{vendor}      ZSET   the vendor's dead-lettered job ids -> when dead-lettered (ms).
# running:{vendor}  SET    the vendor's running job ids.
# jobs:{vendor}     ZSET   every job of the vendor -> seq, for listing newest first.
# idem:{vendor}:{k} STRING job id for an idempotency key; expires after 24 h.
# batch:{vendor}:{batch}  SET  the job ids of one batch ("batches/{id}"); expires after the
#                          retention period plus a day from its last job's submission.
# seq               STRING global submission counter.
# vendors           SET    every vendor that ever submitted, for global stats.
# counters:{vendor} HASH   monotonic counts: attempts, lease_lost, retried, dead_lettered,
#                          succeeded, failed.
# eta               HASH   run_ms, light:run_ms: moving average of attempt run time per lane,
#                          for queue ETAs.
# blobs             ZSET   stored result URI -> when its job expires (ms); the sweeper
#                          deletes the blob then, so storage is retained as long as the job.
# deliveries        ZSET   succeeded job id -> when its delivery is next due (ms): the upload
#                          to a remote store that failed inline, and/or its record update.
# delivery_tries    HASH   job id -> failed delivery tries so far (for backoff).
# wake              PUBSUB published on every enqueue and requeue: dispatchers wake up.
# cancel            PUBSUB job id of a cancelled running job: its dispatcher cancels the node call.


class Keys:
    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.ring = prefix + "ring"
        self.ring_members = prefix + "ring:members"
        self.leases = prefix + "leases"
        self.seq = prefix + "seq"
        self.vendors = prefix + "vendors"
        self.weights = prefix + "weights"
        self.eta = prefix + "eta"
        self.blobs = prefix + "blobs"
        self.deliveries = prefix + "deliveries"
        self.delivery_tries = prefix + "delivery_tries"
        self.wake_channel = prefix + "wake"
        self.cancel_channel = prefix + "cancel"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def input(self, job_id: str) -> str:
        return f"{self.prefix}input:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}events:{job_id}"

    def queue(self, vendor: str, lane: str = "") -> str:
        return f"{self.prefix}{lane}queue:{vendor}"

    def ring_members_of(self, lane: str) -> str:
        return f"{self.prefix}{lane}ring:members"

    def running(self, vendor: str) -> str:
        return f"{self.prefix}running:{vendor}"

    def vendor_jobs(self, vendor: str) -> str:
        return f"{self.prefix}jobs:{vendor}"

    def counters(self, vendor: str) -> str:
        return f"{self.prefix}counters:{vendor}"

    def batch(self, vendor: str, batch: str) -> str:
        return f"{self.prefix}batch:{vendor}:{batch}"

    def dead_letters(self, vendor: str) -> str:
        return f"{self.prefix}dlq:{vendor}"


# Fairness cost of a job in milli-megapixels, with a floor so that a flood of
# tiny images still pays for the per-job work they cause.
MIN_COST = 50


def job_cost(input_pixels: int) -> int:
    return max(MIN_COST, -(-input_pixels // 1000))


# Queue score layout: priority band above a 40-bit sequence number.
PRIORITY_BAND = 1 << 40
MAX_PRIORITY = 9
