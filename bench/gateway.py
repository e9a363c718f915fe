"""Gateway benchmark: submit throughput and latency with auth, rate limiting and validation on,
straight to the gateway, through Envoy, and against the RPC floor, in one run.

    python bench/gateway.py [--requests 3000] [--concurrency 64] [--rounds 4] [--paced-s 5]

Starts a local cluster (its own redis-server, a scheduler, the gateway; no
inference nodes, so every accepted job stays queued and the measurement is
the gateway's intake path: Bearer key check, two GCRA rate-limit decisions
in Redis, format sniffing and header pixel check of a ~100 KB JPEG, and the
scheduler's enqueue script), Envoy (deploy/envoy/envoy.yaml) in front of
that same gateway, and beside them bench/rpc_floor.py's echo server: a
grpc.aio server with no logic, taking the same ~100 KB (100,000 bytes) per
call. A client process keeps `--concurrency` unary calls in flight and
records each call's latency.

The same load goes straight to the gateway, through Envoy and to the echo
floor in alternating turns (`--rounds`, `--requests` per path in all, each
round's order rotated), so a drifting machine weighs on all alike. Envoy's
overhead is `envoy_overhead_ratio` = direct submits/s / Envoy submits/s
(1.00: none; 1.10: the Envoy path is 10 % slower). One gateway on both paths:
the ratio is what the extra hop costs, not what a second replica adds. The
gateway against the floor is `vs_floor` = direct submits/s / floor calls/s
(target >= 0.5).

Then, below saturation (open loop, at most 64 in flight, `--paced-s` seconds
each): the gateway at half its own measured rate (paced_*), and the gateway
and the floor both at half the floor's maximum (floor_pace_*: target gateway
p99 <= 2 x the floor's p99 at that rate). (At a closed-loop concurrency of 64,
Little's law ties throughput and latency: mean latency = 64 / throughput.)

Prints a table and writes bench/results/gateway.json (submits_per_s, p50_ms,
p99_ms, paced_rate_per_s, paced_p50_ms, paced_p99_ms, cpu_ms_per_submit: all
straight to the gateway; direct_submits_per_s, envoy_submits_per_s,
envoy_overhead_ratio, envoy_p50_ms, envoy_p99_ms, envoy_cpu_ms_per_submit;
floor_calls_per_s, floor_p50_ms, floor_p99_ms, vs_floor, floor_pace_rate_per_s,
floor_pace_floor_p50_ms/p99_ms, floor_pace_gateway_p50_ms/p99_ms).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import rpc_floor  # noqa: E402
from bench.scheduler import cpu_info, cpu_seconds  # noqa: E402
from cutout import AsyncClient  # noqa: E402
from cutout.client import build_submission  # noqa: E402
from services.gateway.auth import new_key  # noqa: E402
from services.local.cluster import ClusterConfig, LocalCluster  # noqa: E402
from tests.support.tinymodel import build_tiny_model  # noqa: E402


def jpeg_100kb() -> bytes:
    """A real photo re-encoded to about 100 KB."""
    from skimage import data

    img = Image.fromarray(data.astronaut())
    for quality in range(95, 20, -5):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        if buf.tell() <= 100 * 1024:
            return buf.getvalue()
    return buf.getvalue()


async def drive(address: str, key: str, image: bytes, total: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    submissions = [build_submission(image) for _ in range(total)]
    next_index = 0
    async with AsyncClient(address, key, rate_limit_wait_s=0) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < total:
                sub = submissions[next_index]
                next_index += 1
                start = time.perf_counter()
                await client.submit_submission(sub)
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def open_loop(call: Callable[[], Awaitable[object]], total: int, rate: float) -> list[float]:
    """Calls started at a fixed rate (at most 64 in flight), each one timed."""
    latencies: list[float] = []
    in_flight = asyncio.Semaphore(64)

    async def one() -> None:
        async with in_flight:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    tasks = []
    begin = time.perf_counter()
    for i in range(total):
        await asyncio.sleep(max(0.0, begin + i / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return latencies


async def paced(address: str, key: str, image: bytes, total: int, rate: float) -> list[float]:
    """Open loop: submits started at a fixed rate (at most 64 in flight), each one timed."""
    async with AsyncClient(address, key, rate_limit_wait_s=0) as client:
        return await open_loop(
            lambda: client.submit_submission(build_submission(image)), total, rate
        )


async def paced_floor(port: int, total: int, rate: float) -> list[float]:
    """The echo floor's unary call (100,000 bytes in, 64 out), open loop at `rate`."""
    identity = rpc_floor._identity
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{rpc_floor.SERVICE}/Unary", identity, identity)
        payload = b"j" * 100_000
        return await open_loop(lambda: call(payload), total, rate)


def cpu_now(cluster: LocalCluster, floor_pid: int) -> dict[str, float]:
    """CPU seconds of every process, Envoy, the echo floor and this client included."""
    cpu = {**cpu_seconds(cluster), "client": time.process_time()}
    if cluster.envoy is not None and cluster.envoy.proc is not None:
        cpu["envoy"] = rpc_floor.cpu_s(cluster.envoy.proc.pid)
    cpu["floor"] = rpc_floor.cpu_s(floor_pid)
    return cpu


def ms(latencies: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(latencies) * 1000, q)), 2)


@dataclass
class PathRun:
    """Everything measured on one path (direct or through Envoy) over its rounds."""

    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall_s

    def ms(self, q: float) -> float:
        return round(float(np.percentile(np.array(self.latencies) * 1000, q)), 2)

    def cpu_ms_per_submit(self) -> dict[str, float]:
        return {k: round(v * 1000 / len(self.latencies), 3) for k, v in self.cpu_s.items()}


PATHS = ("direct", "envoy", "floor")


async def alternate(
    cluster: LocalCluster, key: str, image: bytes, floor: tuple[int, int], args: argparse.Namespace
) -> dict[str, PathRun]:
    """The same closed-loop load on every path, in turns; each round's order rotates."""
    addresses = {"direct": cluster.gateway_address, "envoy": cluster.public_address}
    floor_pid, floor_port = floor
    runs = {path: PathRun() for path in PATHS}
    per_round = max(1, args.requests // args.rounds)
    for i in range(args.rounds):
        for path in PATHS[i % 3 :] + PATHS[: i % 3]:
            before = cpu_now(cluster, floor_pid)
            started = time.perf_counter()
            if path == "floor":
                _, latencies = await rpc_floor.drive(
                    floor_port, "unary", per_round, args.concurrency, warmup=0
                )
            else:
                latencies = await drive(addresses[path], key, image, per_round, args.concurrency)
            runs[path].latencies += latencies
            runs[path].wall_s += time.perf_counter() - started
            after = cpu_now(cluster, floor_pid)
            for proc, seconds in after.items():
                if proc in before:
                    runs[path].cpu_s[proc] = (
                        runs[path].cpu_s.get(proc, 0.0) + seconds - before[proc]
                    )
    return runs


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000, help="submits per path")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per path")
    parser.add_argument("--paced-s", type=float, default=5.0, help="seconds of each paced run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gateway.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cutout-bench-gw-"))
    (work / "models").mkdir()
    build_tiny_model(work / "models" / "tiny.onnx")
    key = new_key()
    # Limits on, but high enough that the run measures admitted submits.
    limits = "requests=1000000/60,remove_background=1000000/60,batches=1000/60"
    cluster = LocalCluster(
        ClusterConfig(
            nodes=1,
            gateway_port=0,
            envoy=True,
            workdir=work / "cluster",
            model_dir=work / "models",
            api_keys={"bench": key},
            rate_limits=limits,
            extra_env={"CUTOUT_LOG_LEVEL": "WARNING", "CUTOUT_MAX_QUEUED_PER_VENDOR": "1000000"},
        )
    )
    cluster.start(start_nodes=False)
    floor_server, floor_port = rpc_floor.start_server()
    image = jpeg_100kb()
    try:
        for address in (cluster.gateway_address, cluster.public_address):  # warm-up
            await drive(address, key, image, 200, args.concurrency)
        await rpc_floor.drive(floor_port, "unary", 0, args.concurrency)  # its warm-up
        runs = await alternate(cluster, key, image, (floor_server.pid, floor_port), args)
        direct, envoy, floor = runs["direct"], runs["envoy"], runs["floor"]
        # What a vendor sees below saturation: half the measured rate, open loop.
        rate = direct.rate / 2
        calm = await paced(cluster.gateway_address, key, image, int(rate * args.paced_s), rate)
        # Both at half the floor's maximum, floor first.
        floor_rate = floor.rate / 2
        n = int(floor_rate * args.paced_s)
        floor_calm = await paced_floor(floor_port, n, floor_rate)
        gateway_calm = await paced(cluster.gateway_address, key, image, n, floor_rate)
    finally:
        floor_server.terminate()
        floor_server.wait(10)
        cluster.stop()
    result = {
        "submits_per_s": round(direct.rate, 1),
        "p50_ms": direct.ms(50),
        "p99_ms": direct.ms(99),
        "direct_submits_per_s": round(direct.rate, 1),
        "envoy_submits_per_s": round(envoy.rate, 1),
        "envoy_overhead_ratio": round(direct.rate / envoy.rate, 3),
        "envoy_p50_ms": envoy.ms(50),
        "envoy_p99_ms": envoy.ms(99),
        "paced_rate_per_s": round(rate, 1),
        "paced_p50_ms": ms(calm, 50),
        "paced_p99_ms": ms(calm, 99),
        "floor_calls_per_s": round(floor.rate, 1),
        "floor_p50_ms": floor.ms(50),
        "floor_p99_ms": floor.ms(99),
        "vs_floor": round(direct.rate / floor.rate, 3),
        "floor_pace_rate_per_s": round(floor_rate, 1),
        "floor_pace_floor_p50_ms": ms(floor_calm, 50),
        "floor_pace_floor_p99_ms": ms(floor_calm, 99),
        "floor_pace_gateway_p50_ms": ms(gateway_calm, 50),
        "floor_pace_gateway_p99_ms": ms(gateway_calm, 99),
        "requests": len(direct.latencies),
        "envoy_requests": len(envoy.latencies),
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "image_bytes": len(image),
        # Where the time goes: CPU milliseconds per submit in each process
        # (Envoy idles on the direct path).
        "cpu_ms_per_submit": direct.cpu_ms_per_submit(),
        "envoy_cpu_ms_per_submit": envoy.cpu_ms_per_submit(),
        "floor_cpu_ms_per_call": floor.cpu_ms_per_submit(),
        "pipeline": "auth + 2 GCRA decisions + sniff/header check + enqueue script",
        "floor": "bench/rpc_floor.py echo server: grpc.aio, raw bytes, 100,000 in, 64 out",
        "cpu": cpu_info(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result, direct, envoy, args)
    print_floor_table(result, floor)
    print(f"wrote {args.out}")


def print_table(
    result: dict[str, object], direct: PathRun, envoy: PathRun, args: argparse.Namespace
) -> None:
    print(
        f"{'metric (concurrency ' + str(args.concurrency) + ')':<40} {'direct':>10} {'envoy':>10}"
    )
    print(f"{'submits/s (target >= 1000 direct)':<40} {direct.rate:>10.1f} {envoy.rate:>10.1f}")
    print(f"{'p50 latency (ms)':<40} {direct.ms(50):>10} {envoy.ms(50):>10}")
    print(f"{'p99 latency (ms) (target <= 25 direct)':<40} {direct.ms(99):>10} {envoy.ms(99):>10}")
    overhead = result["envoy_overhead_ratio"]
    print(f"{'envoy overhead (direct / envoy submits/s)':<40} {'':>10} {overhead:>10}")
    paced_label = f"direct paced at {result['paced_rate_per_s']}/s: p50 / p99"
    print(f"{paced_label:<40} {result['paced_p50_ms']:>10} {result['paced_p99_ms']:>10}")
    direct_cpu, envoy_cpu = direct.cpu_ms_per_submit(), envoy.cpu_ms_per_submit()
    for proc in direct_cpu:
        label = "CPU ms per submit: " + proc
        print(f"{label:<40} {direct_cpu[proc]:>10} {envoy_cpu.get(proc, 0.0):>10}")


def print_floor_table(result: dict[str, object], floor: PathRun) -> None:
    def verdict(ok: bool) -> str:
        return "pass" if ok else "FAIL"

    print(f"{'against the RPC floor':<40} {'gateway':>10} {'floor':>10}  target")
    ratio = float(result["vs_floor"])  # type: ignore[arg-type]
    print(
        f"{'calls/s, closed loop':<40} {result['submits_per_s']!s:>10} "
        f"{result['floor_calls_per_s']!s:>10}  ratio {ratio} >= 0.5: {verdict(ratio >= 0.5)}"
    )
    print(f"{'p50 / p99 ms, closed loop':<40} {'':>10} {floor.ms(50)!s:>5}/{floor.ms(99)!s:<5}")
    rate = result["floor_pace_rate_per_s"]
    g99, f99 = result["floor_pace_gateway_p99_ms"], result["floor_pace_floor_p99_ms"]
    ok = float(g99) <= 2 * float(f99)  # type: ignore[arg-type]
    print(
        f"{'paced at ' + str(rate) + '/s: p50 ms':<40} "
        f"{result['floor_pace_gateway_p50_ms']!s:>10} {result['floor_pace_floor_p50_ms']!s:>10}"
    )
    print(
        f"{'paced at ' + str(rate) + '/s: p99 ms':<40} {g99!s:>10} {f99!s:>10}  "
        f"gateway <= 2x floor: {verdict(ok)}"
    )
    cpu = floor.cpu_ms_per_submit()
    print(
        f"{'CPU ms per call: floor server, client':<40} {cpu['floor']!s:>10} {cpu['client']!s:>10}"
    )


if __name__ == "__main__":
    asyncio.run(main())
