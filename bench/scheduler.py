"""Scheduler benchmark: Cutout against arq and Celery and against the work itself, one run.

    python bench/scheduler.py [--jobs 2000] [--rounds 3] [--nodes 2] [--latency-jobs 100]

Starts a local cluster (its own redis-server, a scheduler, nodes running the
tiny ONNX model the tests build, a gateway) and, on the same box and the same
redis-server, the same per-job work (decode the 64x64 JPEG, the tiny model
through services.inference.pipeline.run, PNG encode) through two peers
(bench/peers.py): arq and Celery (Redis broker, Redis result backend), each
with as many worker processes as Cutout has node processes. The systems take
turns in `--rounds` rounds, each round in a rotated order, so a drifting box
weighs on all alike; figures are medians over the rounds. Measured:

  throughput   jobs/s for a backlog of `--jobs`: first job accepted -> last job
               done. Cutout's goes gateway -> scheduler -> nodes, spread over 4
               vendors with v0 flooding (70% of the jobs); each peer's is one
               FIFO queue (they have no fairness between vendors);
  work limit   cores / CPU seconds of one job's work run in this process
               (time.process_time, 200 jobs, once per round): what the box could
               do with no queue at all;
  jain_index   Jain's fairness index of the jobs each vendor was served while all
               four were backlogged (1.0 = perfectly even), Cutout only;
  delay        p50/p99 scheduling delay (accepted -> started) of jobs paced at half
               each system's own median throughput, so it is the queue's own
               latency, not time spent waiting behind a backlog;
  CPU          ms per job of every process (/proc/<pid>/stat): Cutout's scheduler,
               nodes, gateway, Redis; each peer's workers (pool children
               included) and Redis;
  dispatch     Cutout's scheduler scripts without nodes: enqueue + claim + complete
               cycles through the Lua scripts on the same Redis.

How the peers are tuned (bench/peers.py has the reasons): arq `poll_delay`
0.01 s (default 0.5) and `max_jobs` 32 (default 10); Celery prefork with a pool
of `--nodes` children, `worker_prefetch_multiplier` 64 (default 4; the Celery
Optimizing guide's advice for many short tasks), `task_acks_late` off (the
default; `--celery-acks-late` turns it on), gossip, mingle and heartbeats off.

Prints a table with each target's pass/fail (reported, never asserted) and
writes bench/results/scheduler.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import peers  # noqa: E402
from cutout import AsyncClient  # noqa: E402
from cutout.client import build_submission  # noqa: E402
from cutout.v1 import jobs_pb2  # noqa: E402
from services.gateway.auth import new_key  # noqa: E402
from services.inference.models import ModelCatalog  # noqa: E402
from services.local.cluster import ClusterConfig, LocalCluster  # noqa: E402
from services.scheduler.keys import Keys  # noqa: E402
from services.scheduler.store import Store  # noqa: E402
from tests.support.tinymodel import build_tiny_model  # noqa: E402

VENDORS = ["v0", "v1", "v2", "v3"]


small_jpeg = peers.small_jpeg


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


SYSTEMS = ("cutout", "arq", "celery")
REDIS_DB = {"arq": 1, "celery": 2}  # the peers' own databases on the bench's redis-server


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_info() -> dict[str, str]:
    """The CPU's model name and flags, from /proc/cpuinfo."""
    info = {"model": platform.processor() or platform.machine(), "flags": ""}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["flags"] == "":
            info["model"] = value.strip()
        elif key.strip() == "flags":
            info["flags"] = value.strip()
            break
    return info


def work_limit(catalog: ModelCatalog, image: bytes, jobs: int = 200) -> dict[str, float]:
    """cores / CPU seconds of one job's work, run here (time.process_time)."""
    peers.work(catalog, image)  # warm
    started = time.process_time()
    for _ in range(jobs):
        peers.work(catalog, image)
    per_job = (time.process_time() - started) / jobs
    cores = len(os.sched_getaffinity(0))
    return {"cpu_ms_per_job": per_job * 1000, "jobs_per_s": cores / per_job}


def peer_url(cluster: LocalCluster, kind: str) -> str:
    return cluster.redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB[kind]}"


async def peer_run(
    cluster: LocalCluster,
    kind: str,
    work: Path,
    args: argparse.Namespace,
    jobs: int,
    rate: float | None = None,
) -> dict[str, object]:
    """Start the peer's workers, run `jobs` of the bench's job through it, stop them."""
    url = peer_url(cluster, kind)
    await aioredis.from_url(url).flushdb()
    assert cluster.redis is not None and cluster.redis.proc is not None
    redis_pid = cluster.redis.proc.pid
    image = small_jpeg(32 if rate else 64)
    run = peers.arq_jobs if kind == "arq" else peers.celery_jobs
    with peers.Workers(
        kind, url, work / "models", work / "peers", args.nodes, args.celery_acks_late
    ) as workers:
        # Warm-up, not measured: a fresh Celery pool lagged every job by ~270 ms at first.
        await run(url, image, 4 * args.nodes)
        before = (workers.cpu_s(), proc_cpu_s(redis_pid))
        times = await run(url, image, jobs, rate)
        after = (workers.cpu_s(), proc_cpu_s(redis_pid))
    n = len(times)
    delays = [(started - enqueued) * 1000 for enqueued, started, _ in times]
    return {
        "jobs": n,
        "jobs_per_s": n / (max(t[2] for t in times) - min(t[0] for t in times)),
        "p50_ms": round(percentile(delays, 0.5), 1),
        "p99_ms": round(percentile(delays, 0.99), 1),
        "cpu_ms_per_job": {
            "workers": round((after[0] - before[0]) * 1000 / n, 2),
            "redis": round((after[1] - before[1]) * 1000 / n, 2),
        },
    }


def rotated(i: int) -> tuple[str, ...]:
    return SYSTEMS[i % 3 :] + SYSTEMS[: i % 3]


async def rounds(
    cluster: LocalCluster, keys: dict[str, str], work: Path, args: argparse.Namespace
) -> tuple[dict[str, list[dict[str, object]]], list[dict[str, float]]]:
    """Every system's backlog run, in rotated order each round; the work limit each round."""
    catalog = peers.load_catalog(work / "models")
    runs: dict[str, list[dict[str, object]]] = {s: [] for s in SYSTEMS}
    limits = []
    for i in range(args.rounds):
        limits.append(work_limit(catalog, small_jpeg()))
        for system in rotated(i):
            run: dict[str, object]
            if system == "cutout":
                run = dict(await throughput(cluster, keys, args.jobs))
            else:
                run = await peer_run(cluster, system, work, args, args.jobs)
            runs[system].append(run)
            print(f"round {i + 1}: {system:<7} {run['jobs_per_s']:8.1f} jobs/s", flush=True)
    return runs, limits


def median(runs: list[dict[str, object]], key: str) -> float:
    return float(statistics.median(float(r[key]) for r in runs))  # type: ignore[arg-type]


def median_cpu(runs: list[dict[str, object]]) -> dict[str, float]:
    procs = runs[0]["cpu_ms_per_job"]
    assert isinstance(procs, dict)
    return {
        p: round(statistics.median(r["cpu_ms_per_job"][p] for r in runs), 2)  # type: ignore[index]
        for p in procs
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000, help="backlog per system per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2, help="also each peer's worker processes")
    parser.add_argument("--latency-jobs", type=int, default=100)
    parser.add_argument("--celery-acks-late", action="store_true")
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
        runs, limits = await rounds(cluster, keys, work, args)
        rate = {s: max(1.0, median(runs[s], "jobs_per_s") / 2) for s in SYSTEMS}
        lat: dict[str, dict[str, object]] = {
            "cutout": dict(await latency(cluster, keys["v1"], args.latency_jobs, rate["cutout"]))
        }
        for kind in ("arq", "celery"):
            lat[kind] = await peer_run(cluster, kind, work, args, args.latency_jobs, rate[kind])
        ceiling = await dispatch_ceiling(cluster.redis_url, 4000)
    finally:
        cluster.stop()
    result = summarise(runs, limits, lat, ceiling, rate, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")


def summarise(
    runs: dict[str, list[dict[str, object]]],
    limits: list[dict[str, float]],
    lat: dict[str, dict[str, object]],
    ceiling: float,
    rate: dict[str, float],
    args: argparse.Namespace,
) -> dict[str, object]:
    tp = {s: median(runs[s], "jobs_per_s") for s in SYSTEMS}
    limit = float(statistics.median(x["jobs_per_s"] for x in limits))
    cutout_cpu = median_cpu(runs["cutout"])
    return {
        "jobs_per_s": round(tp["cutout"], 1),
        "arq_jobs_per_s": round(tp["arq"], 1),
        "celery_jobs_per_s": round(tp["celery"], 1),
        "work_limit_jobs_per_s": round(limit, 1),
        "vs_arq": round(tp["cutout"] / tp["arq"], 2),
        "vs_celery": round(tp["cutout"] / tp["celery"], 2),
        "vs_work_limit": round(tp["cutout"] / limit, 2),
        "jain_index": round(median(runs["cutout"], "jain_index"), 4),
        "p50_ms": lat["cutout"]["p50_ms"],
        "p99_ms": lat["cutout"]["p99_ms"],
        "arq_p50_ms": lat["arq"]["p50_ms"],
        "arq_p99_ms": lat["arq"]["p99_ms"],
        "celery_p50_ms": lat["celery"]["p50_ms"],
        "celery_p99_ms": lat["celery"]["p99_ms"],
        "paced_rate_per_s": {s: round(r, 1) for s, r in rate.items()},
        "scheduler_cpu_ms_per_job": cutout_cpu.get("scheduler"),
        "cpu_ms_per_job": cutout_cpu,
        "arq_cpu_ms_per_job": median_cpu(runs["arq"]),
        "celery_cpu_ms_per_job": median_cpu(runs["celery"]),
        "work_cpu_ms_per_job": round(
            float(statistics.median(x["cpu_ms_per_job"] for x in limits)), 3
        ),
        "dispatch_only_jobs_per_s": round(ceiling, 1),
        "rounds": {s: [round(float(r["jobs_per_s"]), 1) for r in runs[s]] for s in SYSTEMS}  # type: ignore[arg-type]
        | {"work_limit": [round(x["jobs_per_s"], 1) for x in limits]},
        "cpu_ms_per_job_rounds": {s: [r["cpu_ms_per_job"] for r in runs[s]] for s in SYSTEMS},
        # Per round: Jain's index and the jobs each vendor finished in its fairness window.
        "jain_rounds": [r["jain_index"] for r in runs["cutout"]],
        "served_in_window_rounds": [r["served_in_window"] for r in runs["cutout"]],
        "served_in_fairness_window": [r["served_in_window"] for r in runs["cutout"]],
        "jobs": args.jobs,
        "latency_jobs": args.latency_jobs,
        "nodes": args.nodes,
        "node_capacity": 4,
        "peer_workers": args.nodes,
        "peer_tuning": {
            "arq": {"max_jobs": peers.ARQ_MAX_JOBS, "poll_delay_s": peers.ARQ_POLL_DELAY_S},
            "celery": {
                "pool": "prefork",
                "concurrency": args.nodes,
                "worker_prefetch_multiplier": peers.CELERY_PREFETCH_MULTIPLIER,
                "task_acks_late": args.celery_acks_late,
            },
        },
        "cpu": cpu_info(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }


def print_table(r: dict[str, object]) -> None:
    def row(label: str, cutout: object, arq: object, celery: object, target: str = "") -> None:
        print(f"{label:<30} {cutout!s:>10} {arq!s:>10} {celery!s:>10}  {target}")

    def verdict(ok: bool) -> str:
        return "pass" if ok else "FAIL"

    tp, limit = float(r["jobs_per_s"]), float(r["work_limit_jobs_per_s"])  # type: ignore[arg-type]
    vs_arq, vs_celery = float(r["vs_arq"]), float(r["vs_celery"])  # type: ignore[arg-type]
    jain, sched = float(r["jain_index"]), float(r["scheduler_cpu_ms_per_job"])  # type: ignore[arg-type]
    arq_cpu, celery_cpu = r["arq_cpu_ms_per_job"], r["celery_cpu_ms_per_job"]
    assert isinstance(arq_cpu, dict) and isinstance(celery_cpu, dict)
    cpu = r["cpu_ms_per_job"]
    assert isinstance(cpu, dict)
    print(f"CPU: {r['cpu']['model']}")  # type: ignore[index]
    row("metric (medians)", "cutout", "arq", "celery", "target")
    row("jobs/s", tp, r["arq_jobs_per_s"], r["celery_jobs_per_s"])
    row(
        "cutout / peer",
        "",
        vs_arq,
        vs_celery,
        f">= 1.5x each: {verdict(min(vs_arq, vs_celery) >= 1.5)}",
    )
    row(
        "work limit jobs/s",
        limit,
        "",
        "",
        f"cutout >= 0.5x: {r['vs_work_limit']} {verdict(tp >= 0.5 * limit)}",
    )
    row("delay p50 ms (paced)", r["p50_ms"], r["arq_p50_ms"], r["celery_p50_ms"])
    row("delay p99 ms (paced)", r["p99_ms"], r["arq_p99_ms"], r["celery_p99_ms"])
    row(
        "Jain, v0 floods 70%",
        jain,
        "none",
        "none",
        f">= 0.98: {verdict(jain >= 0.98)}; peers: one FIFO, no fairness",
    )
    row("scheduler CPU ms/job", sched, "", "", f"<= 1: {verdict(sched <= 1.0)}")
    nodes = round(sum(v for k, v in cpu.items() if k.startswith("node")), 2)
    row("workers/nodes CPU ms/job", nodes, arq_cpu["workers"], celery_cpu["workers"])
    row("redis CPU ms/job", cpu.get("redis"), arq_cpu["redis"], celery_cpu["redis"])
    row("gateway CPU ms/job", cpu.get("gateway"), "", "")
    total = round(sum(cpu.values()), 2)
    row(
        "all CPU ms/job", total, round(sum(arq_cpu.values()), 2), round(sum(celery_cpu.values()), 2)
    )
    row("work alone CPU ms/job", r["work_cpu_ms_per_job"], "", "")


if __name__ == "__main__":
    asyncio.run(main())
