"""The public methods the gateway does not serve itself, forwarded to the scheduler as bytes.

The scheduler serves `cutout.v1.CutoutService` for everything but submits
(services/scheduler/public_api.py). The gateway forwards those calls without
parsing them: raw-bytes serializers on both sides, the vendor it
authenticated and the internal token as metadata, the caller's deadline
(else `default_timeout_s` for unary calls; streams such as WatchJob may stay
open as long as the caller likes), cancellation when the caller goes away,
and the scheduler's status, message, details and trailers back unchanged; a
scheduler that cannot be reached is UNAVAILABLE in the gateway's own words.
The method list comes from the service descriptor, so a method added to the
public proto is relayed with no change here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from typing import Any, NoReturn, cast

import grpc

from cutout.v1 import cutout_service_pb2
from services.common.errors import unreachable
from services.common.identity import current_vendor
from services.common.interceptors import Handler
from services.common.internal_auth import InternalToken

SERVICE = cutout_service_pb2.DESCRIPTOR.services_by_name["CutoutService"]
Context = grpc.aio.ServicerContext[bytes, bytes]
# Set by gRPC itself on every response; passing them on would duplicate them.
_RESERVED = frozenset({"content-type", "grpc-status", "grpc-message", "date"})


def _passed_on(metadata: Any) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((k, v) for k, v in (metadata or ()) if k not in _RESERVED)


async def _answer(context: Context, exc: grpc.aio.AioRpcError) -> NoReturn:
    """End the call as the scheduler's did: with its own status, or, when it could not
    be reached (down, restarting, killed mid-stream), UNAVAILABLE in our words, never
    gRPC's text with the scheduler's address (ErrorMapping turns the CutoutError into it)."""
    if (down := unreachable(exc, "scheduler")) is not None:
        raise down
    await context.abort(exc.code(), exc.details() or "", _passed_on(exc.trailing_metadata()))
    raise AssertionError("abort returned")  # pragma: no cover


class Relay:
    """Forwards one public method at a time to the scheduler over `channel`."""

    def __init__(
        self, channel: grpc.aio.Channel, token: InternalToken, default_timeout_s: float
    ) -> None:
        self.channel = channel
        self.token = token
        self.default_timeout_s = default_timeout_s

    def handlers(self, served_here: Collection[str]) -> dict[str, Handler]:
        """A bytes-in, bytes-out handler for every public method not in served_here."""
        out: dict[str, Handler] = {}
        for method in SERVICE.methods:
            if method.name in served_here or method.client_streaming:
                continue
            path = f"/{SERVICE.full_name}/{method.name}"
            if method.server_streaming:
                out[method.name] = grpc.unary_stream_rpc_method_handler(self._stream(path))
            else:
                out[method.name] = grpc.unary_unary_rpc_method_handler(self._unary(path))
        return out

    def _timeout(self, context: Context, streaming: bool) -> float | None:
        remaining = context.time_remaining()
        if remaining is not None and remaining < 1e9:  # the caller set a deadline
            return max(0.0, remaining)
        return None if streaming else self.default_timeout_s

    def _unary(self, path: str) -> Any:
        call_scheduler = self.channel.unary_unary(path, None, None)  # no serializers: bytes

        async def relay(request: bytes, context: Context) -> bytes:
            call = call_scheduler(
                request,
                timeout=self._timeout(context, False),
                metadata=self.token.metadata(current_vendor()),
            )
            try:
                reply = await call
            except grpc.aio.AioRpcError as exc:
                await _answer(context, exc)
            context.set_trailing_metadata(_passed_on(await call.trailing_metadata()))
            return cast(bytes, reply)

        return relay

    def _stream(self, path: str) -> Any:
        call_scheduler = self.channel.unary_stream(path, None, None)

        async def relay(request: bytes, context: Context) -> AsyncIterator[bytes]:
            call = call_scheduler(
                request,
                timeout=self._timeout(context, True),
                metadata=self.token.metadata(current_vendor()),
            )
            # However the caller's RPC ends, the scheduler's stream ends with it. Not left
            # to this generator's `finally`: a caller that hangs up while a message is being
            # written leaves the generator suspended at `yield` until it is garbage-collected.
            context.add_done_callback(cast(Any, lambda _: call.cancel()))
            try:
                async for reply in call:
                    yield cast(bytes, reply)
                context.set_trailing_metadata(_passed_on(await call.trailing_metadata()))
            except grpc.aio.AioRpcError as exc:
                await _answer(context, exc)
            finally:
                call.cancel()

        return relay
