"""The peers bench/scheduler.py compares Cutout with: the same job through arq and Celery.

Every system does the same per-job work (`work()`): decode the bench's 64x64
JPEG, run the tiny ONNX model (tests/support/tinymodel.py) through
services.inference.pipeline.run, encode the PNG. Only how the job reaches a
worker and how its result comes back differs.

    python bench/peers.py arq      # one arq worker process (settings from the environment)
    python bench/peers.py celery   # one Celery worker, prefork pool of CUTOUT_BENCH_PROCS

How each peer is tuned, following its own documentation, for many short jobs:

  arq      one worker process per Cutout node process. `poll_delay` 0.01 s
           instead of 0.5 s: arq sleeps that long between looks at its queue,
           and a job here takes about 2 ms. `max_jobs` 32 instead of 10:
           the jobs a worker takes per look; the work is synchronous, so more
           in flight only buys fewer polls. `keep_result` 60 s (results are
           read once).
  Celery   one worker, prefork pool with as many children as Cutout has node
           processes; `worker_prefetch_multiplier` 64 (the Optimizing guide:
           for many short tasks a large multiplier, "64, or 128"; the default
           4 is for long ones); `task_acks_late` off, the default (an ack
           before the task runs; on, a worker crash costs a retry as in
           Cutout; --celery-acks-late in bench/scheduler.py turns it on);
           gossip, mingle and heartbeats off; pickle serialisation, since
           the image and the PNG are bytes.

Neither has Cutout's fairness between vendors: both serve one FIFO queue.

Environment: CUTOUT_BENCH_REDIS (the broker / queue URL), CUTOUT_BENCH_MODEL_DIR
(holds tiny.onnx), CUTOUT_BENCH_READY (a file written once the worker takes
jobs), CUTOUT_BENCH_PROCS (Celery pool size), CUTOUT_BENCH_ACKS_LATE (1 or 0).
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "clients" / "python")) if p not in sys.path]

from cutout.v1 import jobs_pb2  # noqa: E402
from services.inference import pipeline  # noqa: E402
from services.inference.models import ModelCatalog  # noqa: E402

ARQ_MAX_JOBS = 32
ARQ_POLL_DELAY_S = 0.01
CELERY_PREFETCH_MULTIPLIER = 64
MAX_PIXELS = 40_000_000


def small_jpeg(side: int = 64) -> bytes:
    """The bench's input: random 64x64 RGB noise as a JPEG (as bench/scheduler.py has it)."""
    rng = np.random.default_rng(side)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def load_catalog(model_dir: Path) -> ModelCatalog:
    """The tiny model as a node in the bench cluster loads it: CPU, one intra-op thread."""
    return ModelCatalog.load(model_dir, ["tiny"], ["CPUExecutionProvider"], 1)


OPERATION = jobs_pb2.Operation(
    remove_background=jobs_pb2.RemoveBackground(model="tiny", format=jobs_pb2.OUTPUT_FORMAT_PNG)
)


def work(catalog: ModelCatalog, image: bytes) -> bytes:
    """One job's work, start to finish: the PNG cutout of `image`."""
    return pipeline.run(OPERATION, image, catalog, MAX_PIXELS, lambda stage, percent: None).data


_catalog: ModelCatalog | None = None


def _work_here(image: bytes) -> bytes:
    """work() with this process's catalog, loaded on first use."""
    global _catalog
    if _catalog is None:
        _catalog = load_catalog(Path(os.environ["CUTOUT_BENCH_MODEL_DIR"]))
    return work(_catalog, image)


def _ready() -> None:
    ready = os.environ.get("CUTOUT_BENCH_READY")
    if ready:
        Path(ready).write_text(str(os.getpid()))


# --- arq ---------------------------------------------------------------------------


async def arq_cutout(ctx: dict[str, Any], image: bytes) -> tuple[float, float, bytes]:
    """The arq job: (start, end) in Unix seconds and the PNG.

    The work runs in the worker's event loop, as a synchronous arq job does:
    arq's own advice for CPU-bound work is more worker processes.
    """
    started = time.time()
    png = _work_here(image)
    return started, time.time(), png


async def _arq_startup(ctx: dict[str, Any]) -> None:
    _work_here(small_jpeg())  # load the model and warm it before taking jobs
    _ready()


def arq_worker_settings(redis_url: str) -> dict[str, Any]:
    """Keyword arguments for arq.worker.Worker, tuned as the module docstring says."""
    from arq.connections import RedisSettings

    return {
        "functions": [arq_cutout],
        "redis_settings": RedisSettings.from_dsn(redis_url),
        "max_jobs": ARQ_MAX_JOBS,
        "poll_delay": ARQ_POLL_DELAY_S,
        "keep_result": 60,
        "on_startup": _arq_startup,
        "log_results": False,
    }


def run_arq_worker() -> None:
    from arq.worker import Worker

    worker = Worker(**arq_worker_settings(os.environ["CUTOUT_BENCH_REDIS"]))
    worker.run()


# --- Celery ------------------------------------------------------------------------


def celery_app(redis_url: str, acks_late: bool = False) -> Any:
    """The Celery app: Redis broker and Redis result backend on the same server."""
    from celery import Celery

    app = Celery("cutout_bench", broker=redis_url, backend=redis_url)
    app.conf.update(
        task_serializer="pickle",
        result_serializer="pickle",
        accept_content=["pickle"],
        worker_prefetch_multiplier=CELERY_PREFETCH_MULTIPLIER,
        task_acks_late=acks_late,
        result_expires=60,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )

    @app.task(name="cutout_bench.cutout")  # type: ignore[untyped-decorator]
    def cutout(image: bytes) -> tuple[float, float, bytes]:
        started = time.time()
        png = _work_here(image)
        return started, time.time(), png

    return app


def run_celery_worker() -> None:
    from celery import signals

    app = celery_app(
        os.environ["CUTOUT_BENCH_REDIS"], os.environ.get("CUTOUT_BENCH_ACKS_LATE") == "1"
    )

    @signals.worker_process_init.connect  # type: ignore[untyped-decorator]
    def _warm(**_: object) -> None:
        _work_here(small_jpeg())  # each pool child loads the model before its first task

    @signals.worker_ready.connect  # type: ignore[untyped-decorator]
    def _is_ready(**_: object) -> None:
        _ready()

    app.worker_main(
        [
            "worker",
            "--pool=prefork",
            f"--concurrency={os.environ.get('CUTOUT_BENCH_PROCS', '2')}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel=WARNING",
        ]
    )


# --- driving them from the bench ---------------------------------------------------

# (enqueued, started, ended) in Unix seconds, one per job.
Times = list[tuple[float, float, float]]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and every live descendant of it."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu s)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += stats.get(current, (0, 0.0))[1]
        todo += [p for p, (parent, _) in stats.items() if parent == current]
    return total


class Workers:
    """Worker processes of one peer (`arq`: `procs` processes; `celery`: one, with a pool of
    `procs`), started and ready on enter, stopped on exit."""

    def __init__(
        self,
        kind: str,
        redis_url: str,
        model_dir: Path,
        workdir: Path,
        procs: int,
        acks_late: bool = False,
    ) -> None:
        self.kind, self.workdir = kind, workdir
        self.count = procs if kind == "arq" else 1
        self.env = {
            **os.environ,
            "CUTOUT_BENCH_REDIS": redis_url,
            "CUTOUT_BENCH_MODEL_DIR": str(model_dir),
            "CUTOUT_BENCH_PROCS": str(procs),
            "CUTOUT_BENCH_ACKS_LATE": "1" if acks_late else "0",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'clients' / 'python'}",
            # Celery refuses pickle as root unless told; the bench's Redis is its own, on
            # loopback, and pickle is how the image and PNG travel as bytes.
            "C_FORCE_ROOT": "1",
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Workers:
        self.workdir.mkdir(parents=True, exist_ok=True)
        readies = []
        for i in range(self.count):
            ready = self.workdir / f"{self.kind}-{i}.ready"
            ready.unlink(missing_ok=True)
            readies.append(ready)
            with (self.workdir / f"{self.kind}-{i}.log").open("ab") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, str(Path(__file__).resolve()), self.kind],
                        env={**self.env, "CUTOUT_BENCH_READY": str(ready)},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + 120
        while not all(r.exists() for r in readies):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.__exit__()
                raise RuntimeError(f"{self.kind} workers did not start; see {self.workdir}")
            time.sleep(0.05)
        if self.kind == "celery":
            # worker_ready comes from the parent: give the pool children their model too.
            time.sleep(1.0)
        return self

    def cpu_s(self) -> float:
        """CPU seconds the workers (pool children included) have used so far."""
        return sum(tree_cpu_s(p.pid) for p in self.procs)

    def __exit__(self, *_: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _pace(i: int, begin: float, rate: float | None) -> None:
    if rate:
        await asyncio.sleep(max(0.0, begin + i / rate - time.monotonic()))


def _checked(enqueued: float, result: tuple[float, float, bytes]) -> tuple[float, float, float]:
    started, ended, png = result
    if not bytes(png).startswith(PNG_MAGIC):
        raise AssertionError("a peer returned something that is not a PNG")
    return enqueued, float(started), float(ended)


async def arq_jobs(redis_url: str, image: bytes, n: int, rate: float | None = None) -> Times:
    """Enqueue n jobs for arq (all at once, or `rate` per second), wait for every result."""
    from arq.connections import RedisSettings, create_pool
    from arq.constants import result_key_prefix

    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        jobs = []
        begin = time.monotonic()
        connections = asyncio.Semaphore(32)  # arq's pool has a connection limit

        async def one(i: int) -> None:
            await _pace(i, begin, rate)
            async with connections:
                jobs.append(await pool.enqueue_job("arq_cutout", image))

        if rate:
            for i in range(n):
                await one(i)
        else:
            await asyncio.gather(*(one(i) for i in range(n)))
        ids = [job.job_id for job in jobs if job is not None]
        while await pool.exists(*(result_key_prefix + i for i in ids)) < len(ids):
            await asyncio.sleep(0.05)
        infos = [await job.result_info() for job in jobs if job is not None]
        # arq records the enqueue time itself (this process's clock, in milliseconds).
        return [_checked(info.enqueue_time.timestamp(), info.result) for info in infos if info]
    finally:
        await pool.aclose()


async def celery_jobs(redis_url: str, image: bytes, n: int, rate: float | None = None) -> Times:
    """Send n tasks to Celery (all at once, or `rate` per second), wait for every result."""
    import redis.asyncio as aioredis

    app = celery_app(redis_url)
    redis = aioredis.from_url(redis_url)
    try:
        sent: list[tuple[float, str]] = []
        begin = time.monotonic()
        for i in range(n):
            await _pace(i, begin, rate)
            sent.append((time.time(), app.send_task("cutout_bench.cutout", args=[image]).id))
        keys = [f"celery-task-meta-{task_id}" for _, task_id in sent]
        while await redis.exists(*keys) < len(keys):
            await asyncio.sleep(0.05)
        return [_checked(t, app.backend.get_task_meta(i)["result"]) for t, i in sent]
    finally:
        await redis.aclose()
        app.close()


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else ""
    if kind == "arq":
        asyncio.set_event_loop(asyncio.new_event_loop())  # arq's Worker asks for the loop
        run_arq_worker()
    elif kind == "celery":
        run_celery_worker()
    else:
        raise SystemExit("usage: python bench/peers.py arq|celery")


if __name__ == "__main__":
    main()
