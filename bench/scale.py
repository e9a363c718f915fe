"""Scale-out without GPUs: one scheduler in front of 1, 2, 4 and 8 fixed-service-time nodes.

    python bench/scale.py [--sizes 1,2,4,8] [--slots 4] [--service-ms 50] [--seconds 3]

For each fleet size a fresh local cluster (its own redis-server, one
scheduler, one gateway) dispatches to N bench/fixed_node.py nodes of
`--slots` slots each, whose every job holds its slot for `--service-ms` and
uses no CPU. A backlog of `--seconds` x the fleet's capacity (N x slots /
service time: 640 jobs/s at 8 x 4 x 50 ms) is submitted at once through the
gateway in batches, so the fleet is never short of work; the nodes' only
limit is then how fast the scheduler fills their slots. Measured per size:

  utilisation   busy slot-time / available slot-time while backlogged: jobs done x
                service time / (N x slots x (last job done - first job started));
  jobs/s        jobs done / the same window;
  scheduler CPU the scheduler process's CPU seconds / that window, in % of one core,
                and its CPU ms per job (/proc/<pid>/stat); Redis's and the gateway's too.

Target: utilisation >= 0.9 at 8 x 4 with 50 ms jobs; where it falls short, the
scheduler's CPU % at that size says whether the scheduler is what stops it (at
~100 % of one core it is: it is one Python process). Prints a table and
writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import small_jpeg  # noqa: E402
from bench.scheduler import cpu_info, cpu_seconds, job_times  # noqa: E402
from cutout import AsyncClient  # noqa: E402
from cutout.client import build_submission  # noqa: E402
from services.gateway.auth import new_key  # noqa: E402
from services.local.cluster import ClusterConfig, LocalCluster, Service  # noqa: E402
from tests.support.tinymodel import build_tiny_model  # noqa: E402


class FixedNodeCluster(LocalCluster):
    """A local cluster whose nodes are bench/fixed_node.py processes instead of real ones."""

    def __init__(
        self, config: ClusterConfig, service_ms: int, stats_dir: Path | None = None
    ) -> None:
        super().__init__(config)
        self.service_ms = service_ms
        self.stats_dir = stats_dir  # each node's counters, as fixed-N.json, on SIGTERM

    def start_node(self, index: int, wait: bool = True, timeout_s: float = 180.0) -> Service:
        env = self._base_env()
        env.update(
            {
                # The port the scheduler was told about (CUTOUT_NODES) before the nodes started.
                "CUTOUT_NODE_LISTEN": f"127.0.0.1:{self._node_ports[index]}",
                "CUTOUT_NODE_ID": f"fixed-{index + 1}",
                "CUTOUT_FIXED_SERVICE_MS": str(self.service_ms),
            }
        )
        if self.stats_dir is not None:
            env["CUTOUT_FIXED_STATS"] = str(self.stats_dir / f"fixed-{index + 1}.json")
        node = self._service(f"fixed-{index + 1}", "bench.fixed_node", env)
        self.nodes.append(node)
        self._spawn(node)
        if wait:
            self._wait_ready(node, timeout_s)
        return node


async def one_size(work: Path, nodes: int, args: argparse.Namespace) -> dict[str, object]:
    key = new_key()
    cluster = FixedNodeCluster(
        ClusterConfig(
            nodes=nodes,
            gateway_port=0,
            workdir=work / f"cluster-{nodes}",
            model_dir=work / "models",
            api_keys={"bench": key},
            extra_env={
                "CUTOUT_LOG_LEVEL": "WARNING",
                "CUTOUT_NODE_CAPACITY": str(args.slots),
                "CUTOUT_NODE_POLL_S": str(args.poll_s),
                "CUTOUT_MAX_QUEUED_PER_VENDOR": "1000000",
                "CUTOUT_MAX_QUEUED": "1000000",
            },
        ),
        args.service_ms,
    )
    offered = nodes * args.slots * 1000 / args.service_ms
    jobs = max(200, int(offered * args.seconds))
    image = small_jpeg()
    cluster.start()
    try:
        await asyncio.sleep(1.0)  # the scheduler's first polls find every node
        before = cpu_seconds(cluster)
        ids: list[str] = []
        async with AsyncClient(cluster.gateway_address, key, timeout_s=300) as client:
            sizes = [min(1000, jobs - start) for start in range(0, jobs, 1000)]
            replies = await asyncio.gather(
                *(client.submit_batch([build_submission(image) for _ in range(k)]) for k in sizes)
            )
            for reply in replies:
                ids += [
                    o.job.name.removeprefix("jobs/") for o in reply.outcomes if o.HasField("job")
                ]
            while True:
                stats = await client.stats()
                if stats.queued == 0 and stats.running == 0:
                    break
                await asyncio.sleep(0.2)
        after = cpu_seconds(cluster)
        redis = aioredis.from_url(cluster.redis_url)
        times = await job_times(redis, ids)
        await redis.aclose()
    finally:
        cluster.stop()
    window_s = (max(t[3] for t in times) - min(t[2] for t in times)) / 1000
    done = len(times)
    cpu = {k: after[k] - before[k] for k in ("scheduler", "redis", "gateway")}
    node_cpu = sum(after[k] - before[k] for k in after if k.startswith("fixed-"))
    return {
        "nodes": nodes,
        "slots": nodes * args.slots,
        "offered_jobs_per_s": round(offered, 1),
        "jobs": done,
        "jobs_per_s": round(done / window_s, 1),
        "utilisation": round(done * args.service_ms / 1000 / (nodes * args.slots * window_s), 3),
        "scheduler_cpu_percent": round(cpu["scheduler"] * 100 / window_s, 1),
        "scheduler_cpu_ms_per_job": round(cpu["scheduler"] * 1000 / done, 2),
        "redis_cpu_ms_per_job": round(cpu["redis"] * 1000 / done, 2),
        "gateway_cpu_ms_per_job": round(cpu["gateway"] * 1000 / done, 2),
        "fixed_nodes_cpu_ms_per_job": round(node_cpu * 1000 / done, 2),
        "window_s": round(window_s, 2),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,2,4,8", help="fleet sizes, in nodes")
    parser.add_argument("--slots", type=int, default=4, help="slots per node")
    parser.add_argument("--service-ms", type=int, default=50, help="each job's slot time")
    parser.add_argument("--seconds", type=float, default=3.0, help="backlog, in capacity-seconds")
    parser.add_argument(
        "--poll-s", type=float, default=0.2, help="CUTOUT_NODE_POLL_S (as bench/scheduler.py)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cutout-bench-scale-"))
    (work / "models").mkdir()
    build_tiny_model(work / "models" / "tiny.onnx")  # the gateway's model list: "tiny"
    rows = []
    for nodes in (int(x) for x in args.sizes.split(",")):
        rows.append(await one_size(work, nodes, args))
        r = rows[-1]
        print(
            f"{nodes} x {args.slots}: {r['jobs_per_s']} jobs/s of {r['offered_jobs_per_s']}, "
            f"utilisation {r['utilisation']}, scheduler CPU {r['scheduler_cpu_percent']} %",
            flush=True,
        )
    result = {
        "sizes": rows,
        "slots_per_node": args.slots,
        "service_ms": args.service_ms,
        "backlog_capacity_seconds": args.seconds,
        "node_poll_s": args.poll_s,
        "target": "utilisation >= 0.9 at 8 x 4 slots with 50 ms jobs",
        "cpu": cpu_info(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(rows, args)
    print(f"wrote {args.out}")


def print_table(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    print(
        f"{'fleet':<8} {'offered/s':>9} {'jobs/s':>8} {'util':>6} {'sched CPU %':>11} "
        f"{'sched ms/job':>12} {'redis ms/job':>12} {'gw ms/job':>9}"
    )
    for r in rows:
        print(
            f"{str(r['nodes']) + ' x ' + str(args.slots):<8} {r['offered_jobs_per_s']!s:>9} "
            f"{r['jobs_per_s']!s:>8} {r['utilisation']!s:>6} {r['scheduler_cpu_percent']!s:>11} "
            f"{r['scheduler_cpu_ms_per_job']!s:>12} {r['redis_cpu_ms_per_job']!s:>12} "
            f"{r['gateway_cpu_ms_per_job']!s:>9}"
        )
    last = rows[-1]
    ok = float(last["utilisation"]) >= 0.9  # type: ignore[arg-type]
    print(
        f"target utilisation >= 0.9 at {last['nodes']} x {args.slots}, {args.service_ms} ms: "
        f"{'pass' if ok else 'FAIL'} (scheduler at {last['scheduler_cpu_percent']} % of a core)"
    )


if __name__ == "__main__":
    asyncio.run(main())
