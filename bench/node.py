"""Node benchmark: one Cutout node against the raw model and rembg, side by side in one run.

    python bench/node.py [--images 8] [--concurrency 2] [--capacity 2]

Measures, in this one process tree and one run, on real JPEGs (scikit-image's
astronaut, chelsea and coffee, cycled) with the same model file
(isnet-general-use from ../shared/models or $CUTOUT_MODEL_DIR):

  raw           onnxruntime session.run on preprocessed tensors, at concurrency
                1..--concurrency (the best is reported): the model's ceiling;
  rembg_loop    rembg.remove in a plain loop;
  rembg_pool    rembg.remove from a thread pool of --concurrency workers;
  rembg_server  rembg's own HTTP server (`rembg s`, same model, same cores), POST
                /api/remove from --concurrency concurrent clients;
  node          a Cutout inference node (python -m services.inference) driven over
                gRPC (InferenceService.Process) by --concurrency concurrent callers.

All parts are started first and then timed in rounds, taking turns (each
round runs --concurrency images through every part, in a rotating order), so
a machine that slows down or speeds up during the run (shared CPUs drift by
25 % within minutes) weighs on every part alike instead of on whichever ran
then. Each part gets a warm-up image first. A part's images/s is its images
over its own timed wall time. Prints images/s, p50/p99 latency and the node's
ratios to the others; writes bench/results/node-<cpu|gpu>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "clients" / "python"))

import grpc  # noqa: E402
import onnxruntime as ort  # noqa: E402

from cutout.v1 import jobs_pb2  # noqa: E402
from services.common.config import default_model_dir  # noqa: E402
from services.inference.masking import KNOWN, MaskSession  # noqa: E402
from services.internal.v1 import inference_service_pb2 as pb  # noqa: E402
from services.internal.v1 import inference_service_pb2_grpc as pb_grpc  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from nodeproc import METADATA, start_node  # noqa: E402

MODEL = "isnet-general-use"


def photos() -> list[bytes]:
    import skimage.data

    out = []
    for name in ("astronaut", "chelsea", "coffee"):
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).save(buf, "JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def stats(name: str, latencies: list[float], wall: float) -> dict[str, float | str]:
    ms = sorted(x * 1000 for x in latencies)
    return {
        "name": name,
        "images": len(ms),
        "images_per_s": len(ms) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def timed_pool(work: Callable[[int], object], n: int, workers: int) -> tuple[list[float], float]:
    """Run work(i) for i < n on `workers` threads; (latency of each, wall time)."""
    latencies: list[float] = []

    def one(i: int) -> None:
        t = time.perf_counter()
        work(i)
        latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(n)))
    return latencies, time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise SystemExit(f"{what} did not start within {timeout_s:.0f} s")


# --- the parts ---------------------------------------------------------------------------------


@dataclass
class Part:
    """One contender: key in the JSON, its row name, one image's work, callers at once."""

    key: str
    name: str
    one: Callable[[int], object]
    workers: int
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    extra: dict[str, float | str] = field(default_factory=dict)

    def timed(self, n: int) -> None:
        lat, wall = timed_pool(self.one, n, self.workers)
        self.latencies += lat
        self.wall += wall

    def row(self) -> dict[str, float | str]:
        return {**stats(self.name, self.latencies, self.wall), **self.extra}


def raw_parts(model_dir: Path, images: list[bytes], concurrency: int) -> list[Part]:
    """session.run alone, inputs preprocessed beforehand, at each concurrency up to the given."""
    prep = KNOWN[MODEL]
    parts = []
    for workers in range(1, concurrency + 1):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, (len(os.sched_getaffinity(0)) or 1) // workers)
        session = ort.InferenceSession(
            str(model_dir / f"{MODEL}.onnx"),
            sess_options=opts,
            providers=ort.get_available_providers(),
        )
        masks = MaskSession(session, prep)
        tensors = [masks.preprocess(Image.open(io.BytesIO(b))) for b in images]
        masks.infer(tensors[0])  # warm-up
        parts.append(
            Part(
                f"raw_x{workers}",
                f"raw session.run x{workers}",
                lambda i, m=masks, t=tensors: m.infer(t[i % len(t)]),  # type: ignore[misc]
                workers,
                extra={"concurrency": workers},
            )
        )
    return parts


def rembg_parts(model_dir: Path, images: list[bytes], workers: int) -> list[Part]:
    os.environ["U2NET_HOME"] = str(model_dir)
    from rembg import new_session, remove

    session = new_session(MODEL)
    remove(images[0], session=session)  # warm-up

    def one(i: int) -> object:
        return remove(images[i % len(images)], session=session)

    return [
        Part("rembg_loop", "rembg.remove loop", one, 1),
        Part("rembg_pool", f"rembg.remove pool x{workers}", one, workers),
    ]


@contextlib.contextmanager
def rembg_server(
    model_dir: Path, images: list[bytes], concurrency: int, logs: Path
) -> Iterator[Part]:
    port = free_port()
    env = {**os.environ, "U2NET_HOME": str(model_dir)}
    rembg = Path(sys.executable).with_name("rembg")
    with (logs / "rembg-s.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                str(rembg),
                "s",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-ui",
                "--log_level",
                "warning",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/api/remove"

    def post(i: int) -> bytes:
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{MODEL}\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + images[i % len(images)]
            + f"\r\n--{boundary}--\r\n".encode()
        )
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        with urllib.request.urlopen(request, timeout=600) as reply:
            data: bytes = reply.read()
        if not data.startswith(b"\x89PNG"):
            raise SystemExit("rembg s answered something that is not a PNG")
        return data

    def up() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"rembg s exited with {proc.returncode}; see {logs / 'rembg-s.log'}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_until(up, 180, "rembg s")
        post(0)  # warm-up: the server loads the model on the first request
        yield Part("rembg_server", f"rembg s, {concurrency} clients", post, concurrency)
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def cutout_node(
    model_dir: Path, images: list[bytes], concurrency: int, capacity: int, logs: Path
) -> Iterator[Part]:
    proc, address = start_node(model_dir, MODEL, capacity, logs)
    channel = grpc.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 64 * 2**20)]
    )
    stub = pb_grpc.InferenceServiceStub(channel)
    op = jobs_pb2.Operation(remove_background=jobs_pb2.RemoveBackground(model=MODEL))

    def one(i: int) -> None:
        request = pb.ProcessRequest(
            name=f"jobs/{uuid.uuid4().hex}", attempt=1, operation=op, image=images[i % len(images)]
        )
        size, got = 0, 0
        for reply in stub.Process(request, timeout=600, metadata=METADATA):
            if reply.HasField("output"):
                size = reply.output.size_bytes
                got += len(reply.output.data)  # inline when small
            got += len(reply.chunk)
        if not size or got != size:
            raise SystemExit("the node's output is incomplete")

    try:
        one(0)  # warm-up
        name = f"cutout node (capacity {capacity}), {concurrency} callers"
        yield Part("node", name, one, concurrency)
    finally:
        channel.close()
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", type=int, default=8, help="timed images per part (whole rounds)"
    )
    parser.add_argument("--concurrency", type=int, default=2, help="client concurrency / pool size")
    parser.add_argument("--capacity", type=int, default=2, help="the node's CUTOUT_NODE_CAPACITY")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    model_dir = default_model_dir()
    if not (model_dir / f"{MODEL}.onnx").is_file():
        raise SystemExit(f"no {MODEL}.onnx in {model_dir} (set CUTOUT_MODEL_DIR)")
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    device = "gpu" if gpu else "cpu"
    images = photos()
    rows: dict[str, dict[str, float | str]] = {}
    rounds = max(1, -(-args.images // args.concurrency))
    with contextlib.ExitStack() as up:
        logs = Path(up.enter_context(tempfile.TemporaryDirectory(prefix="cutout-bench-node-")))
        print("starting every part ...", flush=True)
        parts = [
            up.enter_context(cutout_node(model_dir, images, args.concurrency, args.capacity, logs)),
            *raw_parts(model_dir, images, args.concurrency),
            *rembg_parts(model_dir, images, args.concurrency),
            up.enter_context(rembg_server(model_dir, images, args.concurrency, logs)),
        ]
        for r in range(rounds):
            turn = parts[r % len(parts) :] + parts[: r % len(parts)]
            for part in turn:
                part.timed(args.concurrency)
            print(f"  round {r + 1}/{rounds} done", flush=True)
    for part in parts:
        rows[part.key] = part.row()
    # The model's ceiling: raw session.run at its best concurrency.
    raws = [k for k in rows if k.startswith("raw_x")]
    best = max(raws, key=lambda k: float(rows[k]["images_per_s"]))
    for k in raws:
        print(f"  {rows[k]['name']}: {float(rows[k]['images_per_s']):.3f} images/s")
    rows["raw"] = rows[best]
    for k in raws:
        del rows[k]
    rows = {k: rows[k] for k in ("node", "raw", "rembg_loop", "rembg_pool", "rembg_server")}
    node = float(rows["node"]["images_per_s"])
    ratios = {
        f"node_vs_{k}": node / float(v["images_per_s"]) for k, v in rows.items() if k != "node"
    }
    print()
    print(f"{'part':44} {'images/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'node is':>8}")
    for key, row in rows.items():
        ratio = "" if key == "node" else f"{ratios[f'node_vs_{key}']:.2f}x"
        print(
            f"{row['name']!s:44} {float(row['images_per_s']):9.3f} {float(row['p50_ms']):9.0f} "
            f"{float(row['p99_ms']):9.0f} {ratio:>8}"
        )
    result = {
        "node_images_per_s": node,
        "raw_images_per_s": rows["raw"]["images_per_s"],
        "rembg_loop_images_per_s": rows["rembg_loop"]["images_per_s"],
        "rembg_pool_images_per_s": rows["rembg_pool"]["images_per_s"],
        "rembg_server_images_per_s": rows["rembg_server"]["images_per_s"],
        "device": device,
        "ratios": ratios,
        "parts": rows,
        "settings": vars(args),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cores": len(os.sched_getaffinity(0)),
            "providers": ort.get_available_providers(),
        },
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"node-{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
