"""What every Cutout gRPC server shares: limits, health, reflection, ready files."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from services.common.config import SettingsError
from services.common.reflection import enable_server_reflection

log = logging.getLogger(__name__)

MiB = 1024 * 1024


def server_options(max_message_bytes: int, max_send_bytes: int = 0) -> list[tuple[str, int]]:
    """gRPC takes requests up to `max_message_bytes` and refuses a larger one on its 5-byte
    length prefix (RESOURCE_EXHAUSTED), never holding it whole; it sends responses up to
    `max_send_bytes` (0: the same)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_send_bytes or max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> Any:
    """Serve grpc.health.v1 (SERVING for each name and "") and reflection (v1 and v1alpha)."""
    names = list(service_names)
    servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    enable_server_reflection(server, [*names, health.SERVICE_NAME])
    return servicer


async def set_serving(
    servicer: health_aio.HealthServicer, names: Iterable[str], serving: bool
) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *names]:
        await servicer.set(name, status)


def tls_credentials(cert_path: str, key_path: str) -> grpc.ServerCredentials | None:
    """Server TLS from PEM files; None when neither is set. Half a pair is a settings error."""
    if not cert_path and not key_path:
        return None
    if not (cert_path and key_path):
        raise SettingsError("CUTOUT_TLS_CERT and CUTOUT_TLS_KEY must be set together")
    try:
        pair = (Path(key_path).read_bytes(), Path(cert_path).read_bytes())
    except OSError as exc:
        raise SettingsError(f"cannot read the TLS certificate or key: {exc}") from exc
    return grpc.ssl_server_credentials([pair])


def bind(
    server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Bind to host:port (port 0 picks a free one), with TLS when given; return the port."""
    if credentials is not None:
        port = server.add_secure_port(listen, credentials)
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}: address in use or not available")
    return port


def write_ready_file(path: str, port: int) -> None:
    """Tell a supervisor (cutout-admin up, tests) which port we got, atomically."""
    if not path:
        return
    target = Path(path)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(target)


async def run_until_signalled(
    start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
) -> None:
    """Start, wait for SIGINT/SIGTERM, then stop gracefully."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await start()
    await stopping.wait()
    log.info("signal received, stopping")
    await stop()
