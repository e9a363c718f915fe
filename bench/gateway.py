"""Gateway benchmark: submit throughput and latency with auth, rate limiting and validation on.

    python bench/gateway.py [--requests 3000] [--concurrency 64]

Starts a local cluster (its own redis-server, a scheduler, the gateway; no
inference nodes, so every accepted job stays queued and the measurement is
the gateway's intake path: Bearer key check, two GCRA rate-limit decisions
in Redis, format sniffing and header pixel check of a ~100 KB JPEG, and the
scheduler's enqueue script). A client process keeps `--concurrency` unary
SubmitJob calls in flight and records each call's latency.

Then, below saturation: submits started at half the measured rate (open
loop, at most 64 in flight), whose p50/p99 are what a vendor sees when the
gateway is not the bottleneck. (At a closed-loop concurrency of 64, Little's
law ties the two: mean latency = 64 / throughput.)

Prints a table and writes bench/results/gateway.json (submits_per_s, p50_ms,
p99_ms, paced_rate_per_s, paced_p50_ms, paced_p99_ms, cpu_ms_per_submit).
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
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scheduler import cpu_seconds  # noqa: E402
from cutout import AsyncClient  # noqa: E402
from cutout.client import build_submission  # noqa: E402
from services.gateway.auth import new_key  # noqa: E402
from services.local.cluster import ClusterConfig, LocalCluster  # noqa: E402
from tests.tinymodel import build_tiny_model  # noqa: E402


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


async def paced(address: str, key: str, image: bytes, total: int, rate: float) -> list[float]:
    """Open loop: submits started at a fixed rate (at most 64 in flight), each one timed."""
    latencies: list[float] = []
    in_flight = asyncio.Semaphore(64)
    async with AsyncClient(address, key, rate_limit_wait_s=0) as client:

        async def one() -> None:
            async with in_flight:
                start = time.perf_counter()
                await client.submit_submission(build_submission(image))
                latencies.append(time.perf_counter() - start)

        tasks = []
        begin = time.perf_counter()
        for i in range(total):
            await asyncio.sleep(max(0.0, begin + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return latencies


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
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
            workdir=work / "cluster",
            model_dir=work / "models",
            api_keys={"bench": key},
            rate_limits=limits,
            extra_env={"CUTOUT_LOG_LEVEL": "WARNING", "CUTOUT_MAX_QUEUED_PER_VENDOR": "1000000"},
        )
    )
    cluster.start(start_nodes=False)
    image = jpeg_100kb()
    try:
        await drive(cluster.gateway_address, key, image, 200, args.concurrency)  # warm-up
        cpu_before = {**cpu_seconds(cluster), "client": time.process_time()}
        started = time.perf_counter()
        latencies = await drive(
            cluster.gateway_address, key, image, args.requests, args.concurrency
        )
        wall = time.perf_counter() - started
        cpu_after = {**cpu_seconds(cluster), "client": time.process_time()}
        # What a vendor sees below saturation: half the measured rate, open loop.
        rate = len(latencies) / wall / 2
        calm = await paced(cluster.gateway_address, key, image, int(rate * 5), rate)
    finally:
        cluster.stop()
    ms = np.array(latencies) * 1000
    result = {
        "submits_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "paced_rate_per_s": round(rate, 1),
        "paced_p50_ms": round(float(np.percentile(np.array(calm) * 1000, 50)), 2),
        "paced_p99_ms": round(float(np.percentile(np.array(calm) * 1000, 99)), 2),
        "requests": len(latencies),
        "concurrency": args.concurrency,
        "image_bytes": len(image),
        # Where the time goes: CPU milliseconds per submit in each process.
        "cpu_ms_per_submit": {
            k: round((cpu_after[k] - cpu_before[k]) * 1000 / len(latencies), 3)
            for k in cpu_after
            if k in cpu_before
        },
        "pipeline": "auth + 2 GCRA decisions + sniff/header check + enqueue script",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'metric':<36} {'value':>10} {'target':>10}")
    print(
        f"{'submits/s (concurrency ' + str(args.concurrency) + ')':<36} "
        f"{result['submits_per_s']:>10} {'>= 1000':>10}"
    )
    print(f"{'p50 latency (ms)':<36} {result['p50_ms']:>10} {'':>10}")
    print(f"{'p99 latency (ms)':<36} {result['p99_ms']:>10} {'<= 25':>10}")
    paced_label = f"paced at {result['paced_rate_per_s']}/s: p50 / p99 (ms)"
    print(f"{paced_label:<36} {result['paced_p50_ms']:>10} {result['paced_p99_ms']:>10}")
    for proc, ms in result["cpu_ms_per_submit"].items():  # type: ignore[union-attr]
        print(f"{'CPU ms per submit: ' + proc:<36} {ms:>10}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
