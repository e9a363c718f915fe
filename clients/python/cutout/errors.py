"""The client's one error type, wrapping grpc.RpcError with the server's rich details."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2


@dataclass
class CutoutError(Exception):
    """A call failed. `code` is the gRPC status; `violations` name bad request fields."""

    code: grpc.StatusCode
    message: str
    violations: list[tuple[str, str]] = field(default_factory=list)
    retry_after_s: float | None = None

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> CutoutError:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        details: str = exc.details() or ""  # type: ignore[attr-defined]
        err = cls(code, details)
        for key, value in exc.trailing_metadata() or ():  # type: ignore[attr-defined]
            if key != "grpc-status-details-bin" or not isinstance(value, bytes):
                continue
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                retry = error_details_pb2.RetryInfo()
                if detail.Unpack(bad):
                    err.violations += [(v.field, v.description) for v in bad.field_violations]
                elif detail.Unpack(retry):
                    err.retry_after_s = retry.retry_delay.ToMilliseconds() / 1000
        return err
