"""The store's data: policies it is built with, what it hands out, and the API's Job from a hash."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from cutout.names import job_name
from cutout.v1 import jobs_pb2
from services.common.errors import CutoutError
from services.common.operations import Lane

TERMINAL = (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
Fields = dict[bytes, bytes]


class FleetCapacity(Protocol):
    """Concurrent jobs the fleet can take in a lane: the slots of its healthy nodes, for
    ETAs. The scheduler passes its node pool's."""

    def __call__(self, lane: Lane) -> int: ...


def one_slot(lane: Lane) -> int:
    """A fleet of one slot per lane: the capacity when none is known (tests, benches)."""
    return 1


@dataclass(frozen=True)
class RetryPolicy:
    """Retryable failures wait base * 2^(n-1) (+/- jitter) before attempt n+1;
    after max_retries retries the job is dead-lettered. Attempts lost to the
    cluster's own faults (Charge.FREE) do not count, up to max_free per job:
    beyond that even they do, so a job that keeps killing schedulers still ends."""

    max_retries: int = 3
    base_delay_ms: int = 2000
    jitter: float = 0.2
    max_free: int = 10

    def jitter_factor(self) -> float:
        # Lua's math.random is seeded identically on every call, so the
        # randomness comes from here.
        return random.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True)
class Fairness:
    """Weighted deficit round robin: each turn a vendor gets quantum * weight
    milli-megapixels of credit (see claims.CLAIM)."""

    quantum_milli: int = 1000
    weights: dict[str, float] = field(default_factory=dict)
    default_weight: float = 1.0


@dataclass(frozen=True)
class Retention:
    """How long finished jobs stay readable (seconds)."""

    finished_s: int = 7 * 24 * 3600
    idempotency_s: int = 24 * 3600


@dataclass(frozen=True)
class Admission:
    """Caps on waiting jobs, checked atomically at enqueue."""

    max_queued_per_vendor: int = 10_000
    max_queued: int = 100_000
    retry_after_s: float = 5.0


@dataclass(frozen=True)
class NewJob:
    """A validated submission to store and queue."""

    vendor: str
    submission: jobs_pb2.JobSubmission
    image: bytes
    input_pixels: int
    batch: str = ""


@dataclass(frozen=True)
class Claim:
    """A job leased to one node for one attempt."""

    job_id: str
    attempt: int
    vendor: str
    operation: bytes = b""  # serialized jobs_pb2.Operation
    image: bytes | None = None  # None: the input is gone (the job was cancelled)
    record: bytes = b""  # serialized jobs_pb2.RecordRef, empty when the job names none
    created_ms: int = 0  # when the job was submitted (ms since the epoch)
    lane_run_ms: float | None = None  # its lane's average attempt run time; None: none yet


@dataclass(frozen=True)
class Completion:
    """An attempt's success, to record: its result, whether a delivery is still to
    make, and the progress (stage, percent) pairs not written yet."""

    claim: Claim
    result: jobs_pb2.Result
    deliver: bool = False
    updates: Sequence[tuple[int, int]] = ()
    lease_ms: int = 0


@dataclass(frozen=True)
class Place:
    """Where a queued job stands: its position and the estimated wait (ms, None unknown)."""

    position: int = 0
    wait_ms: int | None = None


def estimate_wait_ms(position: int, capacity: int, active_vendors: int, run_ms: float) -> int:
    """Rounds of the fleet the jobs ahead need, times the average run time.

    Under contention deficit round robin gives each waiting vendor about an
    equal share of the fleet's slots, so a vendor's queue drains at
    capacity / active_vendors jobs per run time.
    """
    share = max(1.0, capacity / max(1, active_vendors))
    return int(-(-position // share) * run_ms)


def place_of(rank: Any, active: int, run_ms: Any, capacity: int) -> Place:
    """A queued job's Place from its 0-based rank (None: not queued), the vendors waiting
    in its lane, the lane's average run time (None: none measured yet) and its capacity."""
    if rank is None:
        return Place()
    position = int(rank) + 1
    if run_ms is None:
        return Place(position)
    return Place(position, estimate_wait_ms(position, capacity, active, float(run_ms)))


def job_from_fields(job_id: str, f: Fields, place: Place = Place()) -> jobs_pb2.Job:
    """Build the API's Job from the hash fields (or hash fields plus events)."""
    state = int(f.get(b"state", b"0"))
    job = jobs_pb2.Job(
        name=job_name(job_id),
        state=state,  # type: ignore[arg-type]
        done=state in TERMINAL,
        priority=int(f.get(b"priority", b"0")),
        client_key=f.get(b"client_key", b"").decode(),
        batch=f.get(b"batch", b"").decode(),
        stage=int(f.get(b"stage", b"0")),  # type: ignore[arg-type]
        progress_percent=int(f.get(b"progress", b"0")),
        node=f.get(b"node", b"").decode(),
        attempt=int(f.get(b"attempt", b"0")),
        input_pixels=int(f.get(b"input_pixels", b"0")),
        queue_position=place.position if state == jobs_pb2.JOB_STATE_QUEUED else 0,
    )
    if state == jobs_pb2.JOB_STATE_QUEUED and place.position and place.wait_ms is not None:
        job.estimated_wait.FromMilliseconds(place.wait_ms)
    job.operation.ParseFromString(f.get(b"operation", b""))
    job.dead_lettered = f.get(b"dead_lettered") == b"1"
    retry_ms = int(f.get(b"retry_ms") or b"0")
    if state == jobs_pb2.JOB_STATE_QUEUED and retry_ms > time.time() * 1000:
        job.retry_time.FromMilliseconds(retry_ms)
    if f.get(b"record"):
        job.record.ParseFromString(f[b"record"])
    job.create_time.FromMilliseconds(int(f.get(b"create_ms", b"0")))
    job.update_time.FromMilliseconds(int(f.get(b"update_ms", b"0")))
    if state == jobs_pb2.JOB_STATE_SUCCEEDED and f.get(b"result"):
        job.result.ParseFromString(f[b"result"])
    elif state in (jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED) and f.get(b"error"):
        job.error.ParseFromString(f[b"error"])
    return job


def ensure_succeeded(job: jobs_pb2.Job) -> None:
    if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        state = jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
        raise CutoutError(
            f"{job.name} is {state}; a result exists only once it has SUCCEEDED",
            grpc.StatusCode.FAILED_PRECONDITION,
        )
