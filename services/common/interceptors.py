"""Server interceptors every service shares, and the one way they wrap a handler.

grpc.aio interceptors see a method handler before the call runs; to act
around the call itself (catch what the handler raises, set who is calling)
they return a new handler whose behaviour wraps the old one. `around` does
that for the three shapes Cutout serves: unary, server streaming, and the
bidirectional Work stream between a scheduler and a node (which the
internal token must guard as much as any unary call). Client streaming, which
Cutout does not serve, passes unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from services.common.errors import CutoutError, abort, store_unavailable, unavailable

log = logging.getLogger(__name__)
STORE_UNAVAILABLE = "the job store is unavailable, retry shortly"

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
# Runs before the handler; may raise CutoutError to refuse the call.
Before: TypeAlias = Callable[[Context], Awaitable[None]]

# Services no interceptor of ours touches: probes and tooling must always work.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def is_open(method: str) -> bool:
    return method.startswith(OPEN_SERVICES)


def around(handler: Handler, before: Before) -> Handler:
    """The handler with `before(context)` run first, in the call's own task."""
    if handler.unary_unary is not None:
        inner_uu: Any = handler.unary_unary

        async def unary(request: Any, context: Context) -> Any:
            await before(context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_us: Any = handler.unary_stream

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            await before(context)
            async for item in inner_us(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_stream is not None:
        inner_ss: Any = handler.stream_stream

        async def bidi(requests: Any, context: Context) -> AsyncIterator[Any]:
            await before(context)
            async for item in inner_ss(requests, context):
                yield item

        return grpc.stream_stream_rpc_method_handler(
            bidi, handler.request_deserializer, handler.response_serializer
        )
    return handler


def as_status(exc: Exception) -> CutoutError | None:
    """The status a domain or infrastructure exception means to a caller, or None."""
    if isinstance(exc, CutoutError):
        return exc
    if store_unavailable(exc):
        # Redis restarting, loading, failing over or out of reach: the caller can
        # retry the same call (services/common/errors.py lists what counts). What went
        # wrong, with Redis's address, is for operators' logs, never for callers.
        log.warning("job store unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
        return unavailable(STORE_UNAVAILABLE)
    return None


def mapping_errors(handler: Handler) -> Handler:
    """The handler with domain errors (and Redis outages) turned into statuses."""
    if handler.unary_unary is not None:
        inner_uu: Any = handler.unary_unary

        async def unary(request: Any, context: Context) -> Any:
            try:
                return await inner_uu(request, context)
            except Exception as exc:
                err = as_status(exc)
                if err is None:
                    raise
                await abort(context, err)

        return grpc.unary_unary_rpc_method_handler(
            unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        inner_us: Any = handler.unary_stream

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for item in inner_us(request, context):
                    yield item
            except Exception as exc:
                err = as_status(exc)
                if err is None:
                    raise
                await abort(context, err)

        return grpc.unary_stream_rpc_method_handler(
            stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_stream is not None:
        return _mapping_bidi_errors(handler)
    return handler


def _mapping_bidi_errors(handler: Handler) -> Handler:
    inner: Any = handler.stream_stream

    async def bidi(requests: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for item in inner(requests, context):
                yield item
        except Exception as exc:
            err = as_status(exc)
            if err is None:
                raise
            await abort(context, err)

    return grpc.stream_stream_rpc_method_handler(
        bidi, handler.request_deserializer, handler.response_serializer
    )


class HandlerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Base of Cutout's interceptors: wraps the handler of every call but the open services."""

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None or is_open(handler_call_details.method):
            return handler
        return self.wrap(handler, handler_call_details.method)

    def wrap(self, handler: Handler, method: str) -> Handler:
        raise NotImplementedError


class ErrorMapping(HandlerInterceptor):
    """Maps CutoutError (and Redis outages) to gRPC statuses for every handler.

    Handlers raise; this is the one place a domain error becomes a status
    with its rich details (BadRequest, RetryInfo, QuotaFailure) and trailers.
    Put it before the interceptors whose refusals it should map.
    """

    def wrap(self, handler: Handler, method: str) -> Handler:
        return mapping_errors(handler)
