"""The floor under every Cutout RPC: a bare grpc.aio call on this machine.

    python bench/rpc_floor.py [--calls 6000] [--concurrency 64]

Runs an echo server with no logic at all (python grpc.aio, raw bytes, no
protobuf, no interceptors) in its own process and drives it from this one
with grpc.aio at the given concurrency, like bench/gateway.py drives the
gateway. Two shapes:

  unary   one 100 KB request, a 64-byte reply: the shape of SubmitJob;
  stream  one 3 KB request, then two replies (a progress message and a
          2 KB output): the shape of one scheduler -> node attempt.

For each it prints calls/s, p50/p99 latency and the CPU milliseconds per
call spent by the server and by the client process. Whatever Cutout does per call comes on
top of these, on the same cores. Writes bench/results/rpc-floor.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "cutout.bench.Echo"


def _identity(b: bytes) -> bytes:
    return b


async def serve(port_file: str) -> None:
    async def unary(request: bytes, context: object) -> bytes:
        return b"x" * 64

    async def stream(request: bytes, context: object) -> AsyncIterator[bytes]:
        yield b"p" * 16
        yield b"o" * 2048

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
            "Stream": grpc.unary_stream_rpc_method_handler(stream, _identity, _identity),
        },
    )
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 32 * 2**20)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    Path(port_file).write_text(str(port))
    await server.wait_for_termination()


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(
    port: int, shape: str, calls: int, concurrency: int, warmup: int = 200
) -> tuple[float, list[float]]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        if shape == "unary":
            call = channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity)
            payload = b"j" * 100_000

            async def one() -> None:
                await call(payload)

        else:
            streaming = channel.unary_stream(f"/{SERVICE}/Stream", _identity, _identity)
            payload = b"j" * 3_000

            async def one() -> None:
                async for _ in streaming(payload):
                    pass

        for _ in range(warmup):
            await one()
        left = calls
        latencies: list[float] = []

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                t = time.perf_counter()
                await one()
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


def start_server() -> tuple[subprocess.Popen[bytes], int]:
    """The echo server in its own process; returns it and its port (bench/gateway.py uses it)."""
    port_file = Path(f"/tmp/cutout-rpc-floor-{os.getpid()}-{time.monotonic_ns()}.port")
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file)])
    try:
        while not (port_file.exists() and port_file.read_text()):
            if server.poll() is not None:
                raise SystemExit("the echo server did not start")
            time.sleep(0.1)
        return server, int(port_file.read_text())
    finally:
        port_file.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=6000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "rpc-floor.json"))
    parser.add_argument("--serve", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    server, port = start_server()
    try:
        rows = {}
        for shape in ("unary", "stream"):
            s0, c0 = cpu_s(server.pid), time.process_time()
            wall, latencies = asyncio.run(drive(port, shape, args.calls, args.concurrency))
            ms = sorted(x * 1000 for x in latencies)
            s1, c1 = cpu_s(server.pid), time.process_time()
            total = args.calls + 200  # CPU counters include the warm-up
            rows[shape] = {
                "calls_per_s": args.calls / wall,
                "p50_ms": ms[len(ms) // 2],
                "p99_ms": ms[int(len(ms) * 0.99)],
                "server_cpu_ms_per_call": (s1 - s0) * 1000 / total,
                "client_cpu_ms_per_call": (c1 - c0) * 1000 / total,
            }
    finally:
        server.terminate()
        server.wait(10)
    print(
        f"{'shape':8} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'server CPU ms/call':>19} {'client CPU ms/call':>19}"
    )
    for shape, row in rows.items():
        print(
            f"{shape:8} {row['calls_per_s']:9.1f} {row['p50_ms']:8.2f} {row['p99_ms']:8.2f} "
            f"{row['server_cpu_ms_per_call']:19.3f} {row['client_cpu_ms_per_call']:19.3f}"
        )
    result = {
        "unary_calls_per_s": rows["unary"]["calls_per_s"],
        "stream_calls_per_s": rows["stream"]["calls_per_s"],
        "shapes": rows,
        "settings": {"calls": args.calls, "concurrency": args.concurrency},
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "grpc": grpc.__version__,
            "cores": len(os.sched_getaffinity(0)),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
