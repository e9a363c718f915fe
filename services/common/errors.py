"""Domain errors: what each kind of failure means, stated once, and its gRPC status.

Every error a service raises to a caller, or that decides what happens to a job, is a
CutoutError. Its type says what kind of failure it is, in class attributes that code
reads instead of lists of status codes (as temporalio's errors carry `non_retryable`):

- `code`: the gRPC status a caller gets; each kind's default (a call may name
  another status of the same kind);
- `retryable`: whether the same call, or another attempt of the same job, can succeed.
  A job whose attempt ends with an error that is not retryable FAILS at once;
- `charged`: whether an attempt it ends uses up one of the job's retries. The job's or
  its node's fault (a node error or crash, the deadline) is; the cluster's own (Redis
  or a scheduler restarting, a store out of reach) is not;
- `started`: False for a refusal before any work (a node full or draining, a quota):
  the attempt does not count at all and the job goes straight back to its queue.

`CutoutError(message, code)` builds the kind its code means (with NOT_FOUND it is a
NotFound), so a type and its status never disagree. A status another of our services
answered with becomes an error through `received` or `from_status`. The edge of each
service turns errors into statuses with rich details (google.rpc.BadRequest,
RetryInfo, QuotaFailure) via `abort` (services/common/interceptors.py: ErrorMapping).

  kind                code                 retryable  charged  started
  CutoutError         INTERNAL             yes        yes      yes   a fault nobody foresaw (a bug)
  InvalidArgument     INVALID_ARGUMENT     no         yes      yes   the input itself is wrong
  FailedPrecondition  FAILED_PRECONDITION  no         yes      yes   not possible here, as asked
  OutOfRange          OUT_OF_RANGE         no         yes      yes
  Unimplemented       UNIMPLEMENTED        no         yes      yes
  NotFound            NOT_FOUND            no         yes      yes
  Unauthenticated     UNAUTHENTICATED      no         yes      yes
  PermissionDenied    PERMISSION_DENIED    no         yes      yes
  DataLoss            DATA_LOSS            no         yes      yes
  ResourceExhausted   RESOURCE_EXHAUSTED   yes        no       no    refused for now, nothing done
  Unavailable         UNAVAILABLE          yes        no       yes   the cluster's own, for now
  PeerFailure         UNAVAILABLE          yes        yes      yes   another service (a node) failed

Kinds of their own subclass these: images.ImageError, inference pipeline.InvalidImage and
faces.FaceError, gateway vendors.RegistryError (InvalidArgument); pipeline.Unsupported,
scheduler storage.ResultElsewhere (FailedPrecondition); inference slots.Full
(ResourceExhausted); scheduler storage.StorageError and records.RecordsUnavailable
(Unavailable). store.Charge.of(error) is the charge of an attempt an error ended.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, Self, cast

import grpc
import redis.exceptions as redis_errors
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass
class FieldViolation:
    field: str
    description: str


@dataclass
class CutoutError(Exception):
    """Base of every error a service turns into a gRPC status: a fault nobody foresaw.

    As a job's attempt failure it is retried and charged (a bug on a node, or one that
    a retry elsewhere gets past); to a caller it is INTERNAL.
    """

    retryable: ClassVar[bool] = True
    charged: ClassVar[bool] = True
    started: ClassVar[bool] = True

    message: str
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    violations: list[FieldViolation] = field(default_factory=list)
    retry_after_s: float | None = None
    # google.rpc.QuotaFailure violations: (subject, description).
    quota_violations: list[tuple[str, str]] = field(default_factory=list)
    # Extra trailing metadata (ratelimit-limit, ratelimit-remaining, ratelimit-reset).
    trailers: list[tuple[str, str]] = field(default_factory=list)
    # Rich details another service sent with this status, passed on as they came.
    relayed: list[any_pb2.Any] = field(default_factory=list)

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        """`CutoutError(message, code)` is the kind its code means; a kind builds itself."""
        kind: type[CutoutError] = cls
        if cls is CutoutError:
            code = kwargs.get("code", args[1] if len(args) > 1 else None)
            kind = _KINDS.get(code, CutoutError) if code is not None else CutoutError
        return cast(Self, super().__new__(kind, *args))

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
        details += self.relayed
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)


@dataclass
class InvalidArgument(CutoutError):
    """The input itself is wrong (a field, the image's bytes): the same call or job fails
    again, so a job FAILS at once."""

    retryable: ClassVar[bool] = False
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class FailedPrecondition(CutoutError):
    """Not possible as asked, here (an operation this node does not run, a result kept by
    another store, a job not in the state the call needs): not retried."""

    retryable: ClassVar[bool] = False
    code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION


@dataclass
class OutOfRange(CutoutError):
    retryable: ClassVar[bool] = False
    code: grpc.StatusCode = grpc.StatusCode.OUT_OF_RANGE


@dataclass
class Unimplemented(CutoutError):
    retryable: ClassVar[bool] = False
    code: grpc.StatusCode = grpc.StatusCode.UNIMPLEMENTED


@dataclass
class NotFound(CutoutError):
    retryable: ClassVar[bool] = False
    code: grpc.StatusCode = grpc.StatusCode.NOT_FOUND


@dataclass
class Unauthenticated(CutoutError):
    retryable: ClassVar[bool] = False
    code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED


@dataclass
class PermissionDenied(CutoutError):
    retryable: ClassVar[bool] = False
    code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class DataLoss(CutoutError):
    retryable: ClassVar[bool] = False
    code: grpc.StatusCode = grpc.StatusCode.DATA_LOSS


@dataclass
class ResourceExhausted(CutoutError):
    """Refused for now, before any work (a quota, a cap on waiting jobs, a node full or
    draining): retried later; an attempt refused so does not count at all."""

    charged: ClassVar[bool] = False
    started: ClassVar[bool] = False
    code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class Unavailable(CutoutError):
    """The cluster's own infrastructure out of reach for now (Redis, the scheduler, a
    result store, the records database): the caller retries the same call, and an
    attempt it ends does not use up a retry."""

    charged: ClassVar[bool] = False
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE


@dataclass
class PeerFailure(CutoutError):
    """Another of our services failed a call: for the scheduler, an inference node's
    error, crash, deadline or silence, or a stream that broke. Retried (on another
    node), and charged: it may be the job that breaks nodes. `code` is what it said."""

    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE


# The kind each status means when a service of ours raises it.
_KINDS: dict[grpc.StatusCode, type[CutoutError]] = {
    kind.code: kind
    for kind in (
        InvalidArgument,
        FailedPrecondition,
        OutOfRange,
        Unimplemented,
        NotFound,
        Unauthenticated,
        PermissionDenied,
        DataLoss,
        ResourceExhausted,
        Unavailable,
    )
}

# What a status another of our services answered with means here: about the job itself
# (its input or its operation: it fails), a refusal before any work (not counted), or,
# anything else, that service failing (a node's error, crash or deadline: counted). A
# NOT_FOUND or UNAUTHENTICATED between our services is a peer at fault, not the job.
_ANSWERS: dict[grpc.StatusCode, type[CutoutError]] = {
    kind.code: kind
    for kind in (InvalidArgument, FailedPrecondition, OutOfRange, Unimplemented, ResourceExhausted)
}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Status's `code` (UNKNOWN for one it lacks)."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


def received(
    code: grpc.StatusCode, message: str, details: Iterable[any_pb2.Any] = ()
) -> CutoutError:
    """The error a status answered by another of our services (a node, the scheduler)
    means here; its code, message and details are kept, to pass on as they came."""
    kind = _ANSWERS.get(code, PeerFailure)
    return kind(message, code, relayed=list(details))


def from_status(status: status_pb2.Status) -> CutoutError:
    """`received` for a google.rpc.Status (a Work stream's end, an enqueue's outcome)."""
    return received(status_code(status.code), status.message, status.details)


def invalid_argument(field_path: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field_path}: {description}",
        violations=[FieldViolation(field_path, description)],
    )


def not_found(what: str) -> NotFound:
    return NotFound(f"{what} not found")


async def abort(context: grpc.aio.ServicerContext[object, object], err: CutoutError) -> NoReturn:
    # The same as abort_with_status: the rich status travels in the trailers.
    status = rpc_status.to_status(err.to_status())
    trailers = tuple(status.trailing_metadata) + tuple(err.trailers)
    await context.abort(status.code, status.details, trailers)
    raise AssertionError("abort returned")  # pragma: no cover


# The trailer that carries a google.rpc.Status (its details: BadRequest, RetryInfo...).
_STATUS_DETAILS = "grpc-status-details-bin"


def unavailable(message: str, retry_after_s: float = 1.0) -> Unavailable:
    """A fault of the cluster, not of the call: the caller retries the same call."""
    return Unavailable(message, retry_after_s=retry_after_s)


def unreachable(exc: grpc.aio.AioRpcError, service: str) -> Unavailable | None:
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
