"""Scheduler benchmark: throughput, scheduling delay and fairness on real processes.

    python bench/scheduler.py [--jobs 2000] [--nodes 2] [--latency-jobs 100]

Starts a local cluster (its own redis-server, a scheduler, nodes running the
tiny ONNX model the tests build, a gateway) and measures, in one run:

  throughput   jobs/s through gateway -> scheduler -> nodes for a backlog spread
               over 4 vendors, vendor v0 flooding (70% of the jobs);
  jain_index   Jain's fairness index of the megapixels each vendor was served
               while all four were backlogged (1.0 = perfectly even);
  delay        p50/p99 scheduling delay (submit accepted -> attempt started) for
               jobs paced at half the measured throughput, so it is the
               scheduler's own latency, not time spent queueing behind a backlog;
  dispatch     the scheduler's ceiling without nodes: enqueue + claim + complete
               cycles through the Lua scripts on the same Redis.

Prints a table and writes bench/results/scheduler.json.
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
import redis.asyncio as aioredis
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cutout import AsyncClient  # noqa: E402
from cutout.client import build_submission  # noqa: E402
from cutout.v1 import jobs_pb2  # noqa: E402
from services.gateway.auth import new_key  # noqa: E402
from services.local.cluster import ClusterConfig, LocalCluster  # noqa: E402
from services.scheduler.keys import Keys  # noqa: E402
from services.scheduler.store import Store  # noqa: E402
from tests.tinymodel import build_tiny_model  # noqa: E402

VENDORS = ["v0", "v1", "v2", "v3"]


def small_jpeg(side: int = 64) -> bytes:
    rng = np.random.default_rng(side)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def jain(xs: list[float]) -> float:
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else 0.0


async def job_times(redis: aioredis.Redis, ids: list[str]) -> list[tuple[str, int, int, int]]:
    """(vendor, create_ms, start_ms, end_ms) of each job, read from the scheduler's hashes."""
    out = []
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hmget(Keys().job(job_id), "vendor", "create_ms", "start_ms", "end_ms")
        rows = await pipe.execute()
    for vendor, created, started, ended in rows:
        if ended:
            out.append((vendor.decode(), int(created), int(started), int(ended)))
    return out


def cpu_seconds(cluster: LocalCluster) -> dict[str, float]:
    """CPU time (user + system) each process of the cluster has used so far."""
    procs = {"redis": cluster.redis.proc if cluster.redis else None}
    for svc in [cluster.gateway, cluster.scheduler, *cluster.nodes]:
        if svc is not None:
            procs[svc.name] = svc.proc
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name, proc in procs.items():
        if proc is None:
            continue
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


async def throughput(cluster: LocalCluster, keys: dict[str, str], total: int) -> dict[str, float]:
    image = small_jpeg()
    cpu_before = cpu_seconds(cluster)
    shares = {"v0": int(total * 0.7), "v1": total // 10, "v2": total // 10, "v3": total // 10}
    ids: list[str] = []
    clients = {v: AsyncClient(cluster.gateway_address, keys[v], timeout_s=300) for v in VENDORS}
    started = time.monotonic()
    batches = [
        (v, min(1000, n - start)) for v, n in shares.items() for start in range(0, n, 1000)
    ]  # SubmitBatch takes at most 1,000 items
    replies = await asyncio.gather(
        *(clients[v].submit_batch([build_submission(image) for _ in range(k)]) for v, k in batches)
    )
    for reply in replies:
        ids += [o.job.name.removeprefix("jobs/") for o in reply.outcomes if o.HasField("job")]
    redis = aioredis.from_url(cluster.redis_url)
    while True:
        all_stats = [await clients[v].stats() for v in VENDORS]
        if all(s.queued == 0 and s.running == 0 for s in all_stats):
            break
        await asyncio.sleep(0.5)
    wall = time.monotonic() - started
    cpu_after = cpu_seconds(cluster)
    times = await job_times(redis, ids)
    await redis.aclose()
    for c in clients.values():
        await c.close()
    first = min(t[1] for t in times)
    last = max(t[3] for t in times)
    # Fairness window: while all four were backlogged, from the moment the last
    # vendor's first job was accepted until the first vendor ran out of work.
    window_start = max(min(t[1] for t in times if t[0] == v) for v in VENDORS)
    window_end = min(max(t[3] for t in times if t[0] == v) for v in VENDORS)
    served = {
        v: sum(1 for t in times if t[0] == v and window_start <= t[3] <= window_end)
        for v in VENDORS
    }
    return {
        "jobs": len(times),
        "jobs_per_s": len(times) / ((last - first) / 1000),
        "wall_s": wall,
        "jain_index": jain([float(served[v]) for v in VENDORS]),
        "served_in_window": served,  # type: ignore[dict-item]
        # Where the time goes: CPU milliseconds per job in each process.
        "cpu_ms_per_job": {  # type: ignore[dict-item]
            k: round((cpu_after[k] - cpu_before[k]) * 1000 / max(1, len(times)), 2)
            for k in cpu_after
        },
    }


async def latency(cluster: LocalCluster, key: str, jobs: int, rate: float) -> dict[str, float]:
    image = small_jpeg(32)
    redis = aioredis.from_url(cluster.redis_url)
    ids = []
    async with AsyncClient(cluster.gateway_address, key) as client:
        for _ in range(jobs):
            job = await client.submit(image)
            ids.append(job.name.removeprefix("jobs/"))
            await asyncio.sleep(1 / rate)
        while (await client.stats()).queued or (await client.stats()).running:
            await asyncio.sleep(0.2)
    times = await job_times(redis, ids)
    await redis.aclose()
    delays = [float(t[2] - t[1]) for t in times]
    return {"p50_ms": percentile(delays, 0.5), "p99_ms": percentile(delays, 0.99), "n": len(delays)}


async def dispatch_ceiling(redis_url: str, cycles: int) -> float:
    """enqueue + claim + complete through the Lua scripts, 8 concurrent workers."""
    redis = aioredis.from_url(redis_url)
    store = Store(redis, Keys("bench:"))
    sub = jobs_pb2.JobSubmission()
    sub.operation.remove_background.model = "tiny"

    async def worker(n: int) -> None:
        for i in range(n):
            await store.submissions.enqueue(VENDORS[i % 4], sub, b"x" * 1000, 4096)
            claim = await store.claims.claim("bench-node", 10_000)
            if claim is not None:
                await store.attempts.complete(claim, jobs_pb2.Result(uri="local:x"))

    started = time.monotonic()
    await asyncio.gather(*(worker(cycles // 8) for _ in range(8)))
    rate = (cycles // 8 * 8) / (time.monotonic() - started)
    await redis.aclose()
    return rate


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--latency-jobs", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scheduler.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cutout-bench-"))
    (work / "models").mkdir()
    build_tiny_model(work / "models" / "tiny.onnx")
    keys = {v: new_key() for v in VENDORS}
    cluster = LocalCluster(
        ClusterConfig(
            nodes=args.nodes,
            gateway_port=0,
            workdir=work / "cluster",
            model_dir=work / "models",
            api_keys=keys,
            extra_env={
                "CUTOUT_LOG_LEVEL": "WARNING",
                "CUTOUT_NODE_CAPACITY": "4",
                "CUTOUT_NODE_POLL_S": "0.2",
            },
        )
    )
    cluster.start()
    try:
        tp = await throughput(cluster, keys, args.jobs)
        lat = await latency(
            cluster, keys["v1"], args.latency_jobs, rate=max(1.0, tp["jobs_per_s"] / 2)
        )
        ceiling = await dispatch_ceiling(cluster.redis_url, 4000)
    finally:
        cluster.stop()
    result = {
        "jobs_per_s": round(tp["jobs_per_s"], 1),
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "jain_index": round(tp["jain_index"], 4),
        "dispatch_only_jobs_per_s": round(ceiling, 1),
        "jobs": tp["jobs"],
        "latency_jobs": lat["n"],
        "served_in_fairness_window": tp["served_in_window"],
        "cpu_ms_per_job": tp["cpu_ms_per_job"],
        "nodes": args.nodes,
        "node_capacity": 4,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'metric':<40} {'value':>12}")
    label = f"jobs/s end to end (tiny model, {args.nodes} nodes)"
    print(f"{label:<40} {result['jobs_per_s']:>12}")
    print(f"{'scheduling delay p50 (ms)':<40} {result['p50_ms']:>12}")
    print(f"{'scheduling delay p99 (ms)':<40} {result['p99_ms']:>12}")
    print(f"{'Jain index, 4 vendors, v0 flooding':<40} {result['jain_index']:>12}")
    print(f"{'dispatch-only cycles/s (no nodes)':<40} {result['dispatch_only_jobs_per_s']:>12}")
    for proc, ms in tp["cpu_ms_per_job"].items():  # type: ignore[attr-defined]
        print(f"{'CPU ms per job: ' + proc:<40} {ms:>12}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    asyncio.run(main())
