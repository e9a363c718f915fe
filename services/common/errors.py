"""Domain errors and their one mapping to gRPC statuses.

Domain code raises these; the edge of each service turns them into a status
with rich details (google.rpc.BadRequest, RetryInfo) via `abort`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import redis.exceptions as redis_errors
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass
class FieldViolation:
    field: str
    description: str


@dataclass
class CutoutError(Exception):
    """Base of every error a service turns into a gRPC status."""

    message: str
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    violations: list[FieldViolation] = field(default_factory=list)
    retry_after_s: float | None = None
    # google.rpc.QuotaFailure violations: (subject, description).
    quota_violations: list[tuple[str, str]] = field(default_factory=list)
    # Extra trailing metadata (ratelimit-limit, ratelimit-remaining, ratelimit-reset).
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message

    def to_status(self) -> status_pb2.Status:
        details: list[any_pb2.Any] = []
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad)
            details.append(packed)
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(int(self.retry_after_s * 1000))
            packed = any_pb2.Any()
            packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            details.append(packed)
        if self.quota_violations:
            failure = error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(subject=s, description=d)
                    for s, d in self.quota_violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(failure)
            details.append(packed)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)


def invalid_argument(field_path: str, description: str) -> CutoutError:
    return CutoutError(
        f"{field_path}: {description}",
        grpc.StatusCode.INVALID_ARGUMENT,
        [FieldViolation(field_path, description)],
    )


def not_found(what: str) -> CutoutError:
    return CutoutError(f"{what} not found", grpc.StatusCode.NOT_FOUND)


async def abort(context: grpc.aio.ServicerContext[object, object], err: CutoutError) -> NoReturn:
    # The same as abort_with_status: the rich status travels in the trailers.
    status = rpc_status.to_status(err.to_status())
    trailers = tuple(status.trailing_metadata) + tuple(err.trailers)
    await context.abort(status.code, status.details, trailers)
    raise AssertionError("abort returned")  # pragma: no cover


async def abort_status(
    context: grpc.aio.ServicerContext[object, object], status: status_pb2.Status
) -> NoReturn:
    """End the call with a google.rpc.Status received from another service, details kept."""
    relayed = rpc_status.to_status(status)
    await context.abort(relayed.code, relayed.details, tuple(relayed.trailing_metadata))
    raise AssertionError("abort returned")  # pragma: no cover


# The trailer that carries a google.rpc.Status (its details: BadRequest, RetryInfo...).
_STATUS_DETAILS = "grpc-status-details-bin"


def unavailable(message: str, retry_after_s: float = 1.0) -> CutoutError:
    """A fault of the cluster, not of the call: the caller retries the same call."""
    return CutoutError(message, grpc.StatusCode.UNAVAILABLE, retry_after_s=retry_after_s)


def unreachable(exc: grpc.aio.AioRpcError, service: str) -> CutoutError | None:
    """What to answer for a call to another of our services (`service`: "scheduler") that
    failed because it could not be reached, in our own words; None when the status is the
    service's own answer, to be passed on as it is.

    Unreachable: refused, down, restarting, or the connection lost mid-call (a killed
    process). gRPC's text for these names internal addresses and its transport ("failed to
    connect to all addresses; last error: UNKNOWN: ipv4:10.0.3.7:50052: ...", "Stream
    removed (Socket closed)"), nothing a caller can use. It is an UNAVAILABLE without
    rich details, which a service of ours never sends: its UNAVAILABLE comes from
    `unavailable`, with RetryInfo. Still UNAVAILABLE here: the caller retries the call.
    """
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return None
    trailers: Iterable[Any] = exc.trailing_metadata() or ()  # grpc.aio.Metadata: (key, value)
    if any(key == _STATUS_DETAILS for key, _ in trailers):
        return None
    return unavailable(f"the {service} is unavailable, retry shortly")


# Redis replies that mean "not now", not "never": a restart replaying its AOF
# (LOADING), a replica promoted or demoted (READONLY, MASTERDOWN), a script
# cache emptied by a restart between load and call (NOSCRIPT), a long script
# (BUSY), memory full until retention frees some (OOM).
_TRANSIENT_REPLIES = ("LOADING", "MASTERDOWN", "READONLY", "TRYAGAIN", "BUSY", "NOSCRIPT", "OOM")
_TRANSIENT_CLASSES = (
    redis_errors.ConnectionError,  # also BusyLoadingError and "No connection available"
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.NoScriptError,
    redis_errors.TryAgainError,
    redis_errors.ClusterDownError,  # also MasterDownError
    redis_errors.OutOfMemoryError,
)


def store_unavailable(exc: BaseException) -> bool:
    """Whether a Redis error is the store being out of reach for now (retry), not a bug.

    A pipeline's error keeps its class but its message starts "Command # n
    (...) of pipeline caused error: "; the reply's own code follows.
    """
    if isinstance(exc, _TRANSIENT_CLASSES):
        return True
    if isinstance(exc, redis_errors.ResponseError):
        reply = str(exc).rpartition("caused error: ")[2]
        return reply.startswith(_TRANSIENT_REPLIES)
    return False


# Set by gRPC itself on every response; passing them on would duplicate them.
_RESERVED_METADATA = frozenset({"content-type", "grpc-status", "grpc-message", "date"})


def relayed_trailers(metadata: Iterable[Any] | None) -> tuple[tuple[str, str | bytes], ...]:
    """Another service's trailing metadata as a tuple `context.abort` accepts (it refuses
    grpc.aio.Metadata), without the keys gRPC sets itself; rich details travel in it."""
    return tuple((str(k), v) for k, v in (metadata or ()) if k not in _RESERVED_METADATA)


def status_from_code(code: grpc.StatusCode, message: str) -> status_pb2.Status:
    return status_pb2.Status(code=code.value[0], message=message)


# Codes a job failure may carry without retrying: the input itself is the problem.
NON_RETRYABLE = frozenset(
    {
        code_pb2.INVALID_ARGUMENT,
        code_pb2.UNIMPLEMENTED,
        code_pb2.FAILED_PRECONDITION,
        code_pb2.OUT_OF_RANGE,
    }
)
