"""The client's one error type, wrapping grpc.RpcError with the server's rich details."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2


@dataclass
class CutoutError(Exception):
    """A call failed. `code` is the gRPC status; `violations` name bad request fields."""

    code: grpc.StatusCode
    message: str
    violations: list[tuple[str, str]] = field(default_factory=list)
    retry_after_s: float | None = None
    # google.rpc.QuotaFailure: (subject, description) of each exceeded quota.
    quota_violations: list[tuple[str, str]] = field(default_factory=list)
    # Trailing metadata such as ratelimit-limit / ratelimit-remaining / ratelimit-reset.
    trailers: dict[str, str] = field(default_factory=dict)

    @property
    def rate_limited(self) -> bool:
        return self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self.retry_after_s is not None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> CutoutError:
        # Every RpcError grpc raises is also a Call (sync) or an AioRpcError.
        call = cast(grpc.Call, exc)
        err = cls(call.code(), call.details() or "")
        metadata: Any = call.trailing_metadata() or ()
        for key, value in metadata:
            if isinstance(value, str):
                err.trailers[key] = value
            if key != "grpc-status-details-bin" or not isinstance(value, bytes):
                continue
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                retry = error_details_pb2.RetryInfo()
                quota = error_details_pb2.QuotaFailure()
                if detail.Unpack(quota):
                    err.quota_violations += [(v.subject, v.description) for v in quota.violations]
                elif detail.Unpack(bad):
                    err.violations += [(v.field, v.description) for v in bad.field_violations]
                elif detail.Unpack(retry):
                    err.retry_after_s = retry.retry_delay.ToMilliseconds() / 1000
        return err
