"""Open watch streams against another vendor: its latency, and the scheduler's Redis connections.

    python bench/watch.py [--streams 0,300,1000,3000] [--jobs 50] [--probes 60]
    python bench/watch.py --quick          # --streams 0,100,300 --probes 30

Starts a local cluster (its own redis-server, a scheduler, a gateway; no node,
so every watched job stays queued and its stream stays open). For each N,
vendor A opens N `WatchJob` streams through the gateway (spread over its
--jobs queued jobs) and reads each to its first event; then vendor B makes
--probes rounds of one `SubmitJob` and one `GetJob`, one after the other,
and the bench reads `CLIENT LIST` from the cluster's Redis, counting the
scheduler's connections by the names its pools give them (-rpc, -dispatch,
-rpc-watch). Then A's streams close and the next N starts.

Targets (docs/architecture.md#limits): B's p99 at N = 1,000 within 2x its p99
at N = 0, and the scheduler's connection count flat in N (the watch hub holds
two connections whatever N is; before it, each stream held a pooled one for up
to a second at a time, 128 at most, and B's calls queued behind them).

Prints a table and writes bench/results/watch.json with the machine it ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "clients" / "python"))

from cutout.client import build_submission  # noqa: E402
from cutout.v1 import cutout_service_pb2 as pb  # noqa: E402
from cutout.v1 import cutout_service_pb2_grpc as pb_grpc  # noqa: E402
from services.gateway.auth import new_key  # noqa: E402
from services.local.cluster import ClusterConfig, LocalCluster  # noqa: E402
from services.scheduler.server import CLIENT_NAME  # noqa: E402
from tests.support.tinymodel import build_tiny_model  # noqa: E402

STREAMS_PER_CHANNEL = 500  # HTTP/2 streams one client channel carries


def small_jpeg(side: int = 64) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(side)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu() -> dict[str, Any]:
    """The machine: platform, CPU model and flags (/proc/cpuinfo), cores, load."""
    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.strip()
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_model": model,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
    }


async def connections(redis: aioredis.Redis) -> dict[str, int]:
    """Connections to the cluster's Redis: every one, and the scheduler's by pool."""
    clients = await redis.client_list()
    by_name = collections.Counter(c.get("name", "") for c in clients)
    scheduler = {n: k for n, k in by_name.items() if n.startswith(CLIENT_NAME)}
    return {
        "total": len(clients),
        "scheduler": sum(scheduler.values()),
        **{name.removeprefix(CLIENT_NAME + "-"): n for name, n in sorted(scheduler.items())},
    }


class Streams:
    """Vendor A's open WatchJob streams, over as many channels as they need."""

    def __init__(self, address: str, key: str) -> None:
        self.address = address
        self.metadata = (("authorization", f"Bearer {key}"),)
        self.channels: list[grpc.aio.Channel] = []
        self.calls: list[Any] = []

    async def open(self, names: list[str], count: int) -> tuple[float, int]:
        """Open `count` streams, each read to its first event; (seconds, refused)."""
        refused = 0
        started = time.perf_counter()

        async def one(i: int) -> None:
            nonlocal refused
            while len(self.channels) <= i // STREAMS_PER_CHANNEL:
                self.channels.append(grpc.aio.insecure_channel(self.address))
            stub = pb_grpc.CutoutServiceStub(self.channels[i // STREAMS_PER_CHANNEL])
            call = stub.WatchJob(
                pb.WatchJobRequest(name=names[i % len(names)]), metadata=self.metadata
            )
            try:
                await call.read()
                self.calls.append(call)
            except grpc.aio.AioRpcError:
                refused += 1

        for first in range(0, count, 250):  # in waves: the bench client is one process
            await asyncio.gather(*(one(i) for i in range(first, min(count, first + 250))))
        return time.perf_counter() - started, refused

    async def close(self) -> None:
        for call in self.calls:
            call.cancel()
        self.calls = []
        for channel in self.channels:
            await channel.close()
        self.channels = []


async def probe(address: str, key: str, names: list[str], rounds: int) -> dict[str, float]:
    """B's latency: `rounds` x (SubmitJob, then GetJob of one of its jobs), in sequence."""
    metadata = (("authorization", f"Bearer {key}"),)
    image = small_jpeg(48)
    submit: list[float] = []
    get: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CutoutServiceStub(channel)
        for i in range(rounds):
            started = time.perf_counter()
            await stub.SubmitJob(
                pb.SubmitJobRequest(submission=build_submission(image)),
                metadata=metadata,
                timeout=60,
            )
            submit.append(time.perf_counter() - started)
            started = time.perf_counter()
            await stub.GetJob(
                pb.GetJobRequest(name=names[i % len(names)]), metadata=metadata, timeout=60
            )
            get.append(time.perf_counter() - started)
    return {
        "submit_p50_ms": round(percentile(submit, 0.5) * 1000, 1),
        "submit_p99_ms": round(percentile(submit, 0.99) * 1000, 1),
        "get_p50_ms": round(percentile(get, 0.5) * 1000, 1),
        "get_p99_ms": round(percentile(get, 0.99) * 1000, 1),
    }


async def run(cluster: LocalCluster, keys: dict[str, str], args: argparse.Namespace) -> list[Any]:
    address = cluster.gateway_address
    redis = aioredis.from_url(cluster.redis_url)
    image = small_jpeg()
    rows: list[dict[str, Any]] = []
    try:
        names: dict[str, list[str]] = {}
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.CutoutServiceStub(channel)
            for vendor, count in (("a", args.jobs), ("b", 5)):
                metadata = (("authorization", f"Bearer {keys[vendor]}"),)
                names[vendor] = [
                    (
                        await stub.SubmitJob(
                            pb.SubmitJobRequest(submission=build_submission(image)),
                            metadata=metadata,
                        )
                    ).job.name
                    for _ in range(count)
                ]
        await probe(address, keys["b"], names["b"], 10)  # warm up both paths
        for n in args.streams:
            streams = Streams(address, keys["a"])
            try:
                opened_s, refused = await streams.open(names["a"], n)
                await asyncio.sleep(2.0)  # a couple of hub ticks with every stream open
                held = await connections(redis)
                latency = await probe(address, keys["b"], names["b"], args.probes)
                after = await connections(redis)
            finally:
                await streams.close()
            rows.append(
                {
                    "streams": n,
                    "refused": refused,
                    "open_s": round(opened_s, 2),
                    **latency,
                    "scheduler_connections": max(held["scheduler"], after["scheduler"]),
                    "connections_by_pool": held,
                    "redis_connections_total": max(held["total"], after["total"]),
                }
            )
            print(f"  N={n}: {rows[-1]}", flush=True)
            await asyncio.sleep(2.0)  # streams closed: the hub lets its connections go
    finally:
        await redis.aclose()
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", default="0,300,1000,3000", help="comma-separated N")
    parser.add_argument("--jobs", type=int, default=50, help="vendor A's queued jobs watched")
    parser.add_argument("--probes", type=int, default=60, help="B's submit+get rounds per N")
    parser.add_argument("--quick", action="store_true", help="N = 0,100,300 and 30 probes")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "watch.json"))
    args = parser.parse_args()
    if args.quick:
        args.streams, args.probes = "0,100,300", 30
    args.streams = [int(n) for n in args.streams.split(",")]
    machine = cpu()
    work = Path(tempfile.mkdtemp(prefix="cutout-bench-watch-"))
    (work / "models").mkdir()
    build_tiny_model(work / "models" / "tiny.onnx")
    keys = {"a": new_key(), "b": new_key()}
    most = max(args.streams) + 10
    cluster = LocalCluster(
        ClusterConfig(
            nodes=1,
            gateway_port=0,
            workdir=work / "cluster",
            model_dir=work / "models",
            api_keys=keys,
            extra_env={
                "CUTOUT_LOG_LEVEL": "WARNING",
                "CUTOUT_WATCH_STREAMS_PER_VENDOR": str(most),
                "CUTOUT_WATCH_STREAMS": str(most),
            },
        )
    )
    cluster.start(start_nodes=False)  # no node: the watched jobs wait, their streams stay open
    try:
        rows = await run(cluster, keys, args)
    finally:
        cluster.stop()
    base = rows[0] if rows and rows[0]["streams"] == 0 else None
    result = {
        "rows": rows,
        "targets": {
            "b_p99_within_2x_of_n0": {
                str(r["streams"]): (
                    max(r["submit_p99_ms"], r["get_p99_ms"])
                    <= 2 * max(base["submit_p99_ms"], base["get_p99_ms"])
                )
                for r in rows
            }
            if base
            else {},
            "scheduler_connections": [r["scheduler_connections"] for r in rows],
        },
        **machine,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    header = (
        f"{'streams':>8} {'refused':>8} {'open s':>7} {'submit p50':>11} {'submit p99':>11} "
        f"{'get p50':>8} {'get p99':>8} {'sched conns':>12} {'watch conns':>12}"
    )
    print(
        f"B's latency (ms) with N of A's watch streams open; {machine['cpu_model']}, "
        f"{machine['cores']} cores, load {machine['load_average_at_start'][0]:.1f}"
    )
    print(header)
    for r in rows:
        watch = r["connections_by_pool"].get("rpc-watch", 0)
        print(
            f"{r['streams']:>8} {r['refused']:>8} {r['open_s']:>7} {r['submit_p50_ms']:>11} "
            f"{r['submit_p99_ms']:>11} {r['get_p50_ms']:>8} {r['get_p99_ms']:>8} "
            f"{r['scheduler_connections']:>12} {watch:>12}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
