"""Webhook delivery latency: how long after a job ends its signed POST arrives.

    python bench/webhooks.py [--jobs 300] [--concurrency 32]

A local cluster (its own redis-server, scheduler, one node with the tiny model
the tests build, gateway) and an HTTPS receiver on loopback with its own CA
(tests/support/webhook_receiver.py, as in tests/cluster/test_webhooks.py),
reached through CUTOUT_WEBHOOK_ALLOW_HOSTS. Jobs are submitted `--concurrency`
at a time; for each, the delay from the job's end (its `update_time` when it
became SUCCEEDED, in the webhook's own body) to the receiver's clock when the
POST arrived, both read from the same machine's wall clock. Also the receiver's
deliveries/s over the run, and the signature check of every delivery with
PyPI's `standardwebhooks`. Prints a table and writes
bench/results/webhooks.json. No target: the issue sets none; the figure says
what a receiver can expect.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis.asyncio as aioredis  # noqa: E402
from standardwebhooks.webhooks import Webhook  # noqa: E402

from cutout import AsyncClient  # noqa: E402
from services.common import webhook_registry  # noqa: E402
from services.local.cluster import ClusterConfig, LocalCluster  # noqa: E402
from tests.support.cluster import KEYS  # noqa: E402
from tests.support.tinymodel import build_tiny_model  # noqa: E402
from tests.support.tls import make_tls  # noqa: E402
from tests.support.webhook_receiver import start_receiver  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_info() -> dict[str, str]:
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "flags") and key.strip() not in info:
            info[key.strip()] = value.strip()
    return info


async def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    receiver = start_receiver(make_tls(work))
    model_dir = work / "models"
    model_dir.mkdir()
    build_tiny_model(model_dir / "tiny.onnx")
    cluster = LocalCluster(
        ClusterConfig(
            nodes=1,
            gateway_port=0,
            workdir=work / "cluster",
            model_dir=model_dir,
            api_keys=dict(KEYS),
            extra_env={
                "CUTOUT_WEBHOOK_ALLOW_HOSTS": f"127.0.0.1:{receiver.port}",
                "CUTOUT_WEBHOOK_CA_FILE": str(work / "ca.pem"),
                "CUTOUT_LOG_LEVEL": "WARNING",
            },
        )
    )
    cluster.start()
    try:
        redis = aioredis.Redis.from_url(cluster.redis_url)
        secret = await webhook_registry.set_endpoint(
            redis, "cutout:", "vendor-a", receiver.url("bench")
        )
        await redis.aclose()
        assert secret is not None
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "PNG")
        data = buf.getvalue()
        started = time.monotonic()
        async with AsyncClient(cluster.public_address, KEYS["vendor-a"]) as client:
            sem = asyncio.Semaphore(args.concurrency)

            async def one() -> None:
                async with sem:
                    job = await client.submit(data)
                    async for _ in client.watch(job.name):
                        pass

            await asyncio.gather(*(one() for _ in range(args.jobs)))
        deadline = time.monotonic() + 60
        while len(receiver.on("bench")) < args.jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        got = receiver.on("bench")
        elapsed = max(r.at for r in got) - started
        verifier = Webhook(secret)
        delays = []
        wall_offset = time.time() - time.monotonic()  # the receiver stamps monotonic time
        for r in got:
            payload = verifier.verify(r.body, r.headers)
            ended = datetime.fromisoformat(payload["data"]["job"]["updateTime"]).timestamp()
            delays.append((r.at + wall_offset - ended) * 1000)
        ids = {r.headers["webhook-id"] for r in got}
        return {
            "jobs": args.jobs,
            "deliveries": len(got),
            "distinct_webhook_ids": len(ids),
            "signatures_verified": len(got),
            "delay_ms_p50": round(percentile(delays, 0.5), 1),
            "delay_ms_p99": round(percentile(delays, 0.99), 1),
            "delay_ms_max": round(max(delays), 1),
            "deliveries_per_s": round(len(got) / elapsed, 1),
            "concurrency": args.concurrency,
        }
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "webhooks.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cutout-bench-webhooks-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    result.update(
        {
            "cpu": cpu_info(),
            "machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
            f"cores, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"),
        }
    )
    print(
        f"{'jobs':>6} {'delivered':>9} {'ids':>5} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'/s':>7}"
    )
    print(
        f"{result['jobs']:>6} {result['deliveries']:>9} {result['distinct_webhook_ids']:>5} "
        f"{result['delay_ms_p50']:>8} {result['delay_ms_p99']:>8} {result['delay_ms_max']:>8} "
        f"{result['deliveries_per_s']:>7}"
    )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
