"""Scheduler settings, all from environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.config import (
    PROJECT_ROOT,
    SettingsError,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_str,
)
from services.common.internal_auth import InternalToken
from services.common.serving import MiB
from services.common.webhook_policy import WebhookPolicy
from services.scheduler.attempt import DispatchPolicy
from services.scheduler.nodes import split_entries


def parse_weights(entries: list[str]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for entry in entries:
        vendor, _, raw = entry.partition(":")
        try:
            weight = float(raw)
        except ValueError:
            weight = -1.0
        if not vendor or not 0 < weight <= 1000:
            raise SettingsError(
                f"CUTOUT_VENDOR_WEIGHTS entry {entry!r} is not vendor:weight (0-1000]"
            )
        weights[vendor] = weight
    return weights


BACKENDS = ("local", "cloudinary")


def parse_vendor_storage(entries: list[str]) -> dict[str, str]:
    chosen: dict[str, str] = {}
    for entry in entries:
        vendor, _, backend = entry.partition(":")
        if not vendor or backend not in BACKENDS:
            raise SettingsError(
                f"CUTOUT_VENDOR_STORAGE entry {entry!r} is not vendor:backend "
                f"(backend one of {', '.join(BACKENDS)})"
            )
        chosen[vendor] = backend
    return chosen


def parse_nodes(entries: list[str]) -> list[str]:
    try:
        split_entries(entries)
    except ValueError as exc:
        raise SettingsError(f"CUTOUT_NODES: {exc}") from exc
    return entries


@dataclass(frozen=True)
class SchedulerSettings:
    """
    Attributes:
        listen: CUTOUT_SCHEDULER_LISTEN, host:port to serve on (port 0 picks one).
        redis_url: CUTOUT_REDIS_URL, the Redis holding queues and jobs.
        key_prefix: CUTOUT_REDIS_PREFIX, prefix of every Redis key.
        nodes: CUTOUT_NODES, comma-separated inference node addresses: host:port for one
            node, or dns:///name:port for every A/AAAA record of a name (a Kubernetes
            headless service), re-resolved every CUTOUT_NODE_DNS_S seconds.
        node_dns_s: CUTOUT_NODE_DNS_S, seconds between DNS lookups of dns:/// entries.
        node_poll_s: CUTOUT_NODE_POLL_S, seconds between health/load polls (a node whose
            Work stream is open: every 1 s at most, nodes.STREAMING_POLL_S).
        storage_dir: CUTOUT_STORAGE_DIR, where the local result store writes (and where
            outputs wait whose remote upload failed). Shared by all scheduler replicas.
        storage: CUTOUT_STORAGE, the default result backend: local or cloudinary.
        vendor_storage: CUTOUT_VENDOR_STORAGE, comma-separated "vendor:backend" overrides.
        cloudinary_url: CLOUDINARY_URL, cloudinary://KEY:SECRET@CLOUD (required when any
            vendor uses cloudinary; an upload_prefix query parameter changes the API host).
        storage_timeout_s: CUTOUT_STORAGE_TIMEOUT_S, timeout of one remote storage call.
        mysql_url: CUTOUT_MYSQL_URL, mysql://USER[:PASSWORD]@HOST[:PORT]/DB holding the
            vendors' data_records; empty: jobs that name a record are refused.
        delivery_retry_ms: CUTOUT_DELIVERY_RETRY_MS, backoff before a failed upload or record
            update is tried again; it doubles per failure up to five minutes.
        metrics_listen: CUTOUT_METRICS_LISTEN, host:port of the Prometheus /metrics endpoint
            (empty: off).
        metrics_interval_s: CUTOUT_METRICS_INTERVAL_S, how often queue gauges are read from Redis.
        progress_interval_ms: CUTOUT_PROGRESS_INTERVAL_MS, least time between two progress
            writes of one attempt (the latest report is written when it has passed).
        lease_ms: CUTOUT_LEASE_MS, how long a scheduler may fail to renew a running job's
            lease (it died, or lost Redis) before the job is requeued.
        attempt_timeout_s: CUTOUT_ATTEMPT_TIMEOUT_S, the most time one attempt on a node
            may take: the ceiling of the attempt deadline.
        attempt_timeout_floor_s: CUTOUT_ATTEMPT_TIMEOUT_FLOOR_S, the least time one attempt
            gets, whatever its lane's average.
        attempt_timeout_factor: CUTOUT_ATTEMPT_TIMEOUT_FACTOR, the attempt deadline is this
            many times the lane's moving average run time, between the floor and the ceiling.
        node_silent_s: CUTOUT_NODE_SILENT_S, how long every health poll of a node may go
            unanswered before the attempts running on it are abandoned and retried elsewhere.
        reap_interval_s: CUTOUT_REAP_INTERVAL_S, how often a scheduler looks for
            expired leases (their scheduler died) and jobs whose retry backoff ended.
        watch_streams_per_vendor: CUTOUT_WATCH_STREAMS_PER_VENDOR, open WatchJob/WatchBatch
            streams one vendor may have on one scheduler; beyond it RESOURCE_EXHAUSTED.
        watch_streams: CUTOUT_WATCH_STREAMS, open watch streams of all vendors on one
            scheduler; beyond it RESOURCE_EXHAUSTED.
        redis_connections: CUTOUT_REDIS_CONNECTIONS, Redis connections the public and enqueue
            RPCs share (callers wait for a free one, up to 20 s).
        redis_work_connections: CUTOUT_REDIS_WORK_CONNECTIONS, Redis connections of the
            dispatch path (claims, progress, lease renewal, completion, reaper, deliveries),
            a pool of its own so no burst of RPCs can starve it.
        max_retries: CUTOUT_MAX_RETRIES, retries of a retryable failure before the job
            is dead-lettered (so max_retries + 1 attempts).
        quantum_mp: CUTOUT_DRR_QUANTUM_MP, megapixels of credit a vendor of weight 1 gets
            per round-robin turn.
        vendor_weights: CUTOUT_VENDOR_WEIGHTS, comma-separated "vendor:weight" (default 1
            each); a vendor of weight 2 gets twice the megapixels of one of weight 1.
        retry_base_ms: CUTOUT_RETRY_BASE_MS, backoff before the first retry; it doubles
            for each further one, with +/-20% jitter.
        max_queued_per_vendor: CUTOUT_MAX_QUEUED_PER_VENDOR, waiting jobs one vendor may have;
            beyond it submits get RESOURCE_EXHAUSTED.
        max_queued: CUTOUT_MAX_QUEUED, waiting jobs in the whole cluster; beyond it every
            submit is shed with RESOURCE_EXHAUSTED (size it to Redis memory / 20 MiB inputs).
        retention_s: CUTOUT_RETENTION_S, how long finished jobs stay readable; their stored
            outputs are deleted with them.
        max_message_bytes: CUTOUT_MAX_MESSAGE_BYTES, gRPC message limit (images travel inline).
        grace_s: CUTOUT_GRACE_S, how long a stopping scheduler lets attempts finish.
        ready_file: CUTOUT_READY_FILE, file to write the bound port to once serving.
        log_level: CUTOUT_LOG_LEVEL.
        webhooks: CUTOUT_WEBHOOK_* (services/common/webhook_policy.py): how webhook
            deliveries are checked, sent and retried.
        internal_token: CUTOUT_INTERNAL_TOKEN (required) and CUTOUT_INTERNAL_TOKENS_ACCEPTED:
            the shared secret of calls between the services (services/common/internal_auth.py).
    """

    listen: str
    redis_url: str
    key_prefix: str
    nodes: list[str]
    node_poll_s: float
    node_dns_s: float
    progress_interval_ms: int
    storage_dir: Path
    storage: str
    vendor_storage: dict[str, str]
    cloudinary_url: str
    storage_timeout_s: float
    mysql_url: str
    delivery_retry_ms: int
    metrics_listen: str
    metrics_interval_s: float
    lease_ms: int
    attempt_timeout_s: float
    attempt_timeout_floor_s: float
    attempt_timeout_factor: float
    node_silent_s: float
    reap_interval_s: float
    watch_streams_per_vendor: int
    watch_streams: int
    redis_connections: int
    redis_work_connections: int
    max_retries: int
    retry_base_ms: int
    quantum_mp: float
    vendor_weights: dict[str, float]
    max_queued_per_vendor: int
    max_queued: int
    retention_s: int
    max_message_bytes: int
    grace_s: float
    ready_file: str
    internal_token: InternalToken
    webhooks: WebhookPolicy
    log_level: str

    def dispatch_policy(self) -> DispatchPolicy:
        """How attempts are leased, timed and watched, from these settings."""
        return DispatchPolicy(
            lease_ms=self.lease_ms,
            attempt_timeout_s=self.attempt_timeout_s,
            attempt_timeout_floor_s=self.attempt_timeout_floor_s,
            attempt_timeout_factor=self.attempt_timeout_factor,
            node_silent_s=self.node_silent_s,
            reap_interval_s=self.reap_interval_s,
            progress_interval_s=self.progress_interval_ms / 1000,
        )

    @classmethod
    def from_env(cls) -> SchedulerSettings:
        return cls(
            listen=env_str("CUTOUT_SCHEDULER_LISTEN", "127.0.0.1:50052"),
            redis_url=env_str("CUTOUT_REDIS_URL", "redis://127.0.0.1:6379/0"),
            key_prefix=env_str("CUTOUT_REDIS_PREFIX", "cutout:"),
            nodes=parse_nodes(env_list("CUTOUT_NODES", "127.0.0.1:50061")),
            node_poll_s=env_float("CUTOUT_NODE_POLL_S", 0.5, minimum=0.05),
            node_dns_s=env_float("CUTOUT_NODE_DNS_S", 5.0, minimum=0.1),
            progress_interval_ms=env_int("CUTOUT_PROGRESS_INTERVAL_MS", 200, minimum=0),
            storage_dir=Path(env_str("CUTOUT_STORAGE_DIR", str(PROJECT_ROOT / "var" / "results"))),
            storage=env_choice("CUTOUT_STORAGE", "local", BACKENDS),
            vendor_storage=parse_vendor_storage(env_list("CUTOUT_VENDOR_STORAGE")),
            cloudinary_url=env_str("CLOUDINARY_URL", ""),
            storage_timeout_s=env_float("CUTOUT_STORAGE_TIMEOUT_S", 30.0, minimum=0.1),
            mysql_url=env_str("CUTOUT_MYSQL_URL", ""),
            delivery_retry_ms=env_int("CUTOUT_DELIVERY_RETRY_MS", 1000, minimum=10),
            metrics_listen=env_str("CUTOUT_METRICS_LISTEN", "0.0.0.0:9102"),
            metrics_interval_s=env_float("CUTOUT_METRICS_INTERVAL_S", 5.0, minimum=0.1),
            lease_ms=env_int("CUTOUT_LEASE_MS", 15_000, minimum=1000),
            attempt_timeout_s=env_float("CUTOUT_ATTEMPT_TIMEOUT_S", 60.0, minimum=1.0),
            attempt_timeout_floor_s=env_float("CUTOUT_ATTEMPT_TIMEOUT_FLOOR_S", 15.0, minimum=0.1),
            attempt_timeout_factor=env_float("CUTOUT_ATTEMPT_TIMEOUT_FACTOR", 5.0, minimum=1.0),
            node_silent_s=env_float("CUTOUT_NODE_SILENT_S", 5.0, minimum=0.1),
            reap_interval_s=env_float("CUTOUT_REAP_INTERVAL_S", 0.25, minimum=0.01),
            watch_streams_per_vendor=env_int("CUTOUT_WATCH_STREAMS_PER_VENDOR", 1000, minimum=1),
            watch_streams=env_int("CUTOUT_WATCH_STREAMS", 10_000, minimum=1),
            redis_connections=env_int("CUTOUT_REDIS_CONNECTIONS", 128, minimum=2),
            redis_work_connections=env_int("CUTOUT_REDIS_WORK_CONNECTIONS", 32, minimum=2),
            max_retries=env_int("CUTOUT_MAX_RETRIES", 3, minimum=0),
            retry_base_ms=env_int("CUTOUT_RETRY_BASE_MS", 2000, minimum=0),
            quantum_mp=env_float("CUTOUT_DRR_QUANTUM_MP", 1.0, minimum=0.001),
            vendor_weights=parse_weights(env_list("CUTOUT_VENDOR_WEIGHTS")),
            max_queued_per_vendor=env_int("CUTOUT_MAX_QUEUED_PER_VENDOR", 10_000, minimum=1),
            max_queued=env_int("CUTOUT_MAX_QUEUED", 100_000, minimum=1),
            retention_s=env_int("CUTOUT_RETENTION_S", 7 * 24 * 3600, minimum=1),
            max_message_bytes=env_int("CUTOUT_MAX_MESSAGE_BYTES", 32 * MiB, minimum=MiB),
            grace_s=env_float("CUTOUT_GRACE_S", 10.0),
            ready_file=env_str("CUTOUT_READY_FILE", ""),
            log_level=env_str("CUTOUT_LOG_LEVEL", "INFO"),
            internal_token=InternalToken.from_env(),
            webhooks=WebhookPolicy.from_env(),
        ).checked()

    def uses_cloudinary(self) -> bool:
        return "cloudinary" in (self.storage, *self.vendor_storage.values())

    def checked(self) -> SchedulerSettings:
        if self.uses_cloudinary() and not self.cloudinary_url:
            raise SettingsError("a vendor stores results in cloudinary but CLOUDINARY_URL is unset")
        return self
