"""Prometheus metrics every service shares: the /metrics endpoint and RPC counts.

Each service serves `/metrics` on its own port (CUTOUT_METRICS_LISTEN, empty
to switch it off) from prometheus-client's HTTP server thread, so a scrape
never waits on the event loop. Labels stay bounded: method names, status
codes, vendors, nodes and models; never job ids.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from prometheus_client import Counter, Histogram, start_http_server

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

RPCS = Counter(
    "cutout_rpc_requests_total",
    "gRPC calls served, by service, method and status code",
    ["service", "method", "code"],
)
RPC_SECONDS = Histogram(
    "cutout_rpc_seconds",
    "Time to answer a unary gRPC call (streams: time to the end of the stream)",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


def serve(listen: str) -> int:
    """Serve /metrics on host:port (port 0 picks one); return the port, 0 if switched off."""
    if not listen:
        return 0
    host, _, port = listen.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
    return int(server.server_address[1])


def _split(full_method: str) -> tuple[str, str]:
    # "/cutout.v1.CutoutService/SubmitJob" -> ("CutoutService", "SubmitJob")
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service.rsplit(".", 1)[-1], method


def _code(context: grpc.aio.ServicerContext[Any, Any], failed: bool) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN" if failed else "OK"


class RpcMetrics(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts every call by outcome and times it, for unary and streaming handlers."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split(handler_call_details.method)
        if service in ("Health", "ServerReflection"):
            return handler
        timer = RPC_SECONDS.labels(service, method)

        def done(context: Any, started: float, failed: bool) -> None:
            timer.observe(time.perf_counter() - started)
            RPCS.labels(service, method, _code(context, failed)).inc()

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                started, failed = time.perf_counter(), True
                try:
                    reply = await inner_uu(request, context)
                    failed = False
                    return reply
                finally:
                    done(context, started, failed)

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_us: Any = handler.unary_stream

            async def stream(request: Any, context: Any) -> Any:
                started = time.perf_counter()
                failed = [True]

                # Counted when the RPC ends, not in a `finally` here: a stream whose caller
                # hangs up while a message is being written leaves this generator suspended
                # at `yield` until it is garbage-collected.
                def finished(_: object) -> None:
                    if context.cancelled():
                        timer.observe(time.perf_counter() - started)
                        RPCS.labels(service, method, "CANCELLED").inc()
                    else:
                        done(context, started, failed[0])

                context.add_done_callback(finished)
                async for item in inner_us(request, context):
                    yield item
                failed[0] = False

            return grpc.unary_stream_rpc_method_handler(
                stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
