"""Node memory over many jobs: RSS of one inference node across 10,000 varied jobs.

    python bench/memory.py [--jobs 10000] [--concurrency 2]

Starts one node (python -m services.inference) with the tiny ONNX model the
tests build, drives it over its Work stream (through the scheduler's own
WorkLink) with JPEGs of varied sizes (64 px to 1600 px sides, so buffers of
every size come and go) and a few operations (cutout, mask, WebP, crop to
subject, transforms), and samples the node's RSS from /proc every 500 jobs.
Prints a table and writes bench/results/memory.json (`rss_mb` per sample,
`growth_mb` from the first sample after warm-up to the last).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "clients" / "python"))

from cutout.v1 import jobs_pb2  # noqa: E402
from services.internal.v1 import inference_service_pb2 as pb  # noqa: E402
from tests.support.node_link import NodeLink  # noqa: E402
from tests.support.tinymodel import build_tiny_model  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from nodeproc import METADATA, start_node  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def images() -> list[bytes]:
    rng = np.random.default_rng(7)
    out = []
    for side in (64, 200, 512, 900, 1600):
        arr = rng.integers(0, 255, (side, int(side * 1.3), 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


OPERATIONS = [
    jobs_pb2.Operation(remove_background=jobs_pb2.RemoveBackground(model="tiny")),
    jobs_pb2.Operation(remove_background=jobs_pb2.RemoveBackground(model="tiny", mask_only=True)),
    jobs_pb2.Operation(
        remove_background=jobs_pb2.RemoveBackground(
            model="tiny", format=jobs_pb2.OUTPUT_FORMAT_WEBP, crop_to_subject=True
        )
    ),
    jobs_pb2.Operation(
        transform=jobs_pb2.Transform(
            resize=jobs_pb2.RESIZE_MODE_FIT, width_px=300, format=jobs_pb2.OUTPUT_FORMAT_JPEG
        )
    ),
]


def write(out: str, total: int, samples: list[tuple[int, float]], wall: float) -> dict[str, object]:
    """The JSON so far: written at every sample, so a cut-short run still leaves its figures."""
    warm = samples[1][1] if len(samples) > 1 else samples[0][1]  # after the first 1,000 jobs
    result: dict[str, object] = {
        "jobs": samples[-1][0],
        "jobs_planned": total,
        "jobs_per_s": samples[-1][0] / wall,
        "rss_mb": [{"jobs": n, "rss_mb": round(mb, 1)} for n, mb in samples],
        "growth_mb": round(samples[-1][1] - warm, 1),
        "peak_mb": round(max(mb for _, mb in samples), 1),
    }
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


async def drive(
    address: str, pid: int, total: int, concurrency: int, out: str
) -> list[tuple[int, float]]:
    pictures = images()
    samples: list[tuple[int, float]] = []
    started = time.perf_counter()
    done = 0
    async with NodeLink(address, METADATA) as node:

        async def one(i: int) -> None:
            job = pb.WorkJob(
                name=f"jobs/{uuid.uuid4().hex}",
                attempt=1,
                operation=OPERATIONS[i % len(OPERATIONS)],
                image=pictures[(i // len(OPERATIONS)) % len(pictures)],
            )
            await node.run(job, timeout_s=120)

        async def worker(start: int) -> None:
            nonlocal done
            for i in range(start, total, concurrency):
                await one(i)
                done += 1
                if done % 500 == 0:
                    samples.append((done, rss_mb(pid)))
                    print(f"  {done:6d} jobs  rss {samples[-1][1]:7.1f} MB", flush=True)
                    write(out, total, samples, time.perf_counter() - started)

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=2, help="at most the node capacity")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cutout-bench-memory-") as tmp:
        folder = Path(tmp)
        build_tiny_model(folder / "tiny.onnx")
        proc, address = start_node(folder, "tiny", 2, folder, timeout_s=120)
        try:
            started = time.perf_counter()
            samples = asyncio.run(drive(address, proc.pid, args.jobs, args.concurrency, args.out))
            wall = time.perf_counter() - started
        finally:
            proc.terminate()
            proc.wait(30)
    result = write(args.out, args.jobs, samples, wall)
    print(f"\n{'jobs':>8} {'rss MB':>8}")
    for n, mb in samples:
        print(f"{n:8d} {mb:8.1f}")
    print(f"growth after warm-up (1,000 jobs -> {args.jobs:,}): {result['growth_mb']} MB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
