"""Node benchmark: one Cutout node against each runtime and rembg, side by side in one run.

    python bench/node.py [--images 8] [--concurrency 2] [--capacity 2] [--host-repeats 2]

Measures, in this one process tree and one run, on real JPEGs (scikit-image's
astronaut, chelsea and coffee, cycled) with the same model file
(isnet-general-use from ../shared/models or $CUTOUT_MODEL_DIR):

  raw_<runtime>_<precision>
                the model alone on every runtime and precision this host offers
                (services/inference/runtimes.py: ONNX Runtime fp32, OpenVINO fp32,
                OpenVINO bf16 where the CPU has AMX or AVX512_BF16, ...), one run at
                a time with every core, on preprocessed tensors;
  rembg_loop    rembg.remove in a plain loop;
  rembg_pool    rembg.remove from a thread pool of --concurrency workers;
  rembg_server  rembg's own HTTP server (`rembg s`, same model, same cores), POST
                /api/remove from --concurrency concurrent clients;
  node          a Cutout inference node (python -m services.inference) with its
                default runtime (CUTOUT_RUNTIME=auto: the fastest here, chosen at
                start), driven over its Work stream (the scheduler's own WorkLink)
                by --concurrency concurrent callers.

All parts are started first and then timed in rounds, taking turns (each
round runs --concurrency images through every part, in a rotating order), so
a machine that slows down or speeds up during the run (shared CPUs drift by
25 % within minutes) weighs on every part alike instead of on whichever ran
then. Each part gets a warm-up image first. A part's images/s is its images
over its own timed wall time.

Then the host CPU each image costs outside the model, for the node's
pipeline (services/inference/pipeline.run: decode, preprocess, postprocess,
cutout, PNG) and for rembg.remove, on 1, 12 and 24 MP JPEGs: both run with
the model's real output for that image replayed instead of the model, and
the CPU time of the calling thread is taken (the best of --host-repeats).

Prints images/s, p50/p99 latency, the node's ratios to the others and the
host-CPU table; writes bench/results/node-<cpu|gpu>.json with the CPU's
model and flags.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
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
from services.inference import pipeline  # noqa: E402
from services.inference.backends import BACKENDS  # noqa: E402
from services.inference.masking import KNOWN, MaskSession  # noqa: E402
from services.inference.models import LoadedModel, ModelCatalog  # noqa: E402
from services.inference.runtimes import Host, LoadConfig, Runtime, RuntimeInfo  # noqa: E402
from services.inference.selection import available  # noqa: E402
from services.internal.v1 import inference_service_pb2 as pb  # noqa: E402
from services.internal.v1 import inference_service_pb2_grpc as pb_grpc  # noqa: E402
from tests.support.node_link import BlockingNodeLink, output_of  # noqa: E402

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
    masks: MaskSession | None = None  # the model alone: its session, for the host-CPU table

    def timed(self, n: int) -> None:
        lat, wall = timed_pool(self.one, n, self.workers)
        self.latencies += lat
        self.wall += wall

    def row(self) -> dict[str, float | str]:
        return {**stats(self.name, self.latencies, self.wall), **self.extra}


def runtime_parts(model_dir: Path, images: list[bytes], host: Host) -> list[Part]:
    """The model alone on each runtime and precision this host offers, one run at a time."""
    prep = KNOWN[MODEL]
    threads = len(os.sched_getaffinity(0)) or 1
    parts = []
    for c in available(host):
        runtime = BACKENDS[c.runtime].load(
            model_dir / f"{MODEL}.onnx", c.precision, LoadConfig(threads=threads)
        )
        masks = MaskSession(runtime, prep)
        tensors = [masks.preprocess(Image.open(io.BytesIO(b))) for b in images]
        masks.infer(tensors[0])  # warm-up
        parts.append(
            Part(
                f"raw_{c.runtime}_{c.precision}",
                f"model alone: {c} ({threads} threads)",
                lambda i, m=masks, t=tensors: m.infer(t[i % len(t)]),  # type: ignore[misc]
                1,
                extra={"runtime": c.runtime, "precision": c.precision, "threads": threads},
                masks=masks,
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
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.InferenceServiceStub(channel)
    node = BlockingNodeLink(address, METADATA)
    op = jobs_pb2.Operation(remove_background=jobs_pb2.RemoveBackground(model=MODEL))

    def one(i: int) -> None:
        job = pb.WorkJob(
            name=f"jobs/{uuid.uuid4().hex}", attempt=1, operation=op, image=images[i % len(images)]
        )
        header, data = output_of(node.run(job, timeout_s=600))
        if not header.size_bytes or len(data) != header.size_bytes:
            raise SystemExit("the node's output is incomplete")

    try:
        one(0)  # warm-up
        model = stub.GetLoad(pb.GetLoadRequest(), timeout=30, metadata=METADATA).models[0]
        runs_on = f"{model.runtime} {model.precision}, {model.threads} threads"
        name = f"cutout node ({runs_on}; capacity {capacity}), {concurrency} callers"
        extra: dict[str, float | str] = {
            "runtime": model.runtime,
            "device": model.device,
            "precision": model.precision,
            "threads": model.threads,
        }
        yield Part("node", name, one, concurrency, extra=extra)
    finally:
        node.close()
        channel.close()
        proc.terminate()
        proc.wait(60)


# --- host CPU outside the model -----------------------------------------------------------------

HOST_SIZES_MP = (1, 12, 24)


def large_jpeg(megapixels: int) -> bytes:
    """A 4:3 photo of about `megapixels`: chelsea enlarged, with sensor-like noise (sigma 4).

    Enlarged alone it would be unnaturally smooth, and both JPEG decoding and
    PNG encoding cost less on smooth pixels than on a camera's.
    """
    import skimage.data

    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = width * 3 // 4
    img = Image.fromarray(skimage.data.chelsea()).resize((width, height), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(0).normal(0, 4, (height, width, 3))
    pixels = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class Replay:
    """Gives one recorded model output back: the pipeline around it runs, the model does not.

    Satisfies the Runtime protocol for the node's MaskSession and has the
    session.run / get_inputs surface rembg's sessions call.
    """

    name = "replay"

    def __init__(self, output: np.ndarray, inputs: object = None) -> None:
        self.output = output
        self.inputs = inputs

    @classmethod
    def precisions(cls, host: Host) -> tuple[str, ...]:
        return ("fp32",)

    @classmethod
    def unavailable(cls, host: Host) -> str:
        return ""

    @classmethod
    def load(cls, path: Path, precision: str, config: LoadConfig) -> Runtime:
        raise NotImplementedError

    def input_shape(self) -> tuple[int | None, ...]:
        return (1, 3, *KNOWN[MODEL].size[::-1])

    def run(self, batch: object, feed: object = None) -> np.ndarray:
        return self.output if feed is None else [self.output]  # type: ignore[return-value]

    def get_inputs(self) -> object:
        return self.inputs

    def describe(self) -> RuntimeInfo:
        return RuntimeInfo("replay", "cpu", "fp32", 0)


def decode_jpeg(data: bytes) -> None:
    Image.open(io.BytesIO(data)).load()


def thread_cpu_ms(work: Callable[[], object], repeats: int) -> float:
    """Least CPU time of this thread over `repeats` runs (PIL, numpy and zlib run in it)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.thread_time()
        work()
        best = min(best, time.thread_time() - t)
    return best * 1000


STAGE_NAMES = {
    jobs_pb2.STAGE_DECODING: "decode",
    jobs_pb2.STAGE_INFERENCE: "pre+postprocess",
    jobs_pb2.STAGE_COMPOSITING: "cutout",
    jobs_pb2.STAGE_ENCODING: "encode",
}


def node_cpu(data: bytes, catalog: ModelCatalog, repeats: int) -> tuple[float, dict[str, float]]:
    """The node pipeline's least CPU ms for one image, and that run's split between stages."""
    op = jobs_pb2.Operation(remove_background=jobs_pb2.RemoveBackground(model=MODEL))
    best, best_parts = float("inf"), {}
    stages: list[tuple[int, float]] = []
    for _ in range(repeats):
        stages.clear()
        t = time.thread_time()
        pipeline.run(op, data, catalog, 10**9, lambda s, _: stages.append((s, time.thread_time())))
        stages.append((-1, time.thread_time()))
        total = (time.thread_time() - t) * 1000
        if total < best:
            parts: dict[str, float] = {}
            for (stage, t0), (_, t1) in itertools.pairwise(stages):
                key = STAGE_NAMES.get(stage, "other")
                parts[key] = round(parts.get(key, 0.0) + (t1 - t0) * 1000, 1)
            best, best_parts = total, parts
    return best, best_parts


def host_cpu(model_dir: Path, model: MaskSession, repeats: int) -> dict[str, dict[str, object]]:
    """Host CPU ms per image outside the model: the node's pipeline and rembg.remove."""
    os.environ["U2NET_HOME"] = str(model_dir)
    from rembg import new_session, remove

    rembg_session = new_session(MODEL)
    inputs = rembg_session.inner_session.get_inputs()
    table: dict[str, dict[str, object]] = {}
    for mp in HOST_SIZES_MP:
        data = large_jpeg(mp)
        img = pipeline.decode(data, 10**9)
        replay = Replay(model.infer(model.preprocess(img)), inputs)  # the real model, once
        catalog = ModelCatalog(
            [LoadedModel(MODEL, MaskSession(replay, KNOWN[MODEL]), "", [], replay.describe())]
        )
        rembg_session.inner_session = replay
        node_ms, parts = node_cpu(data, catalog, repeats)
        rembg_ms = thread_cpu_ms(functools.partial(remove, data, session=rembg_session), repeats)
        # rembg.remove without its PNG: the JPEG decoded, then remove() on the decoded image
        # (which returns the cutout instead of encoding it).
        rembg_decode = thread_cpu_ms(functools.partial(decode_jpeg, data), repeats)
        rembg_core = thread_cpu_ms(functools.partial(remove, img, session=rembg_session), repeats)
        rembg_without_png = rembg_decode + rembg_core
        node_without_png = node_ms - parts.get("encode", 0.0)
        w, h = img.size
        table[f"{mp}MP"] = {
            "size": f"{w}x{h}",
            "node": node_ms,
            "rembg": rembg_ms,
            "node_vs_rembg": node_ms / rembg_ms,
            "node_parts": parts,
            # Without the PNG encoding: decoding, pre- and postprocessing and the cutout.
            "node_without_png": node_without_png,
            "rembg_without_png": rembg_without_png,
            "without_png_node_vs_rembg": node_without_png / rembg_without_png,
        }
        print(
            f"  {mp:2} MP ({w}x{h}): node {node_ms:6.0f} ms, rembg.remove {rembg_ms:6.0f} ms "
            f"({node_ms / rembg_ms:.2f})",
            flush=True,
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", type=int, default=8, help="timed images per part (whole rounds)"
    )
    parser.add_argument("--concurrency", type=int, default=2, help="client concurrency / pool size")
    parser.add_argument("--capacity", type=int, default=2, help="the node's CUTOUT_NODE_CAPACITY")
    parser.add_argument(
        "--host-repeats", type=int, default=2, help="runs per size for host CPU (best kept)"
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    model_dir = default_model_dir()
    if not (model_dir / f"{MODEL}.onnx").is_file():
        raise SystemExit(f"no {MODEL}.onnx in {model_dir} (set CUTOUT_MODEL_DIR)")
    host = Host.detect()
    gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    device = "gpu" if gpu else "cpu"
    print(f"CPU: {host.cpu_model}; bf16 natively: {host.cpu_bf16}", flush=True)
    images = photos()
    rows: dict[str, dict[str, float | str]] = {}
    rounds = max(1, -(-args.images // args.concurrency))
    with contextlib.ExitStack() as up:
        logs = Path(up.enter_context(tempfile.TemporaryDirectory(prefix="cutout-bench-node-")))
        print("starting every part ...", flush=True)
        parts = [
            up.enter_context(cutout_node(model_dir, images, args.concurrency, args.capacity, logs)),
            *runtime_parts(model_dir, images, host),
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
        raws = [k for k in rows if k.startswith("raw_")]
        # The model's ceiling: the fastest runtime alone.
        best = max(raws, key=lambda k: float(rows[k]["images_per_s"]))
        fastest = next(p.masks for p in parts if p.key == best)
        assert fastest is not None
        print("host CPU per image outside the model ...", flush=True)
        host_table = host_cpu(model_dir, fastest, args.host_repeats)
    rows["raw"] = dict(rows[best])
    order = ["node", *raws, "raw", "rembg_loop", "rembg_pool", "rembg_server"]
    rows = {k: rows[k] for k in order}
    node = float(rows["node"]["images_per_s"])
    ratios = {
        f"node_vs_{k}": node / float(v["images_per_s"]) for k, v in rows.items() if k != "node"
    }
    print()
    print(f"{'part':64} {'images/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'node is':>8}")
    for key, row in rows.items():
        if key == "raw":
            continue
        ratio = "" if key == "node" else f"{ratios[f'node_vs_{key}']:.2f}x"
        print(
            f"{row['name']!s:64} {float(row['images_per_s']):9.3f} {float(row['p50_ms']):9.0f} "
            f"{float(row['p99_ms']):9.0f} {ratio:>8}"
        )
    print()
    print(
        f"{'host CPU ms/image':18} {'node':>8} {'rembg':>8} {'node/rembg':>11}  "
        f"{'without PNG: node':>17} {'rembg':>6} {'ratio':>6}  node's parts"
    )
    for size, r in host_table.items():
        parts_ms = ", ".join(f"{k} {v:.0f}" for k, v in r["node_parts"].items())  # type: ignore[attr-defined]
        print(
            f"{size + ' ' + str(r['size']):18} {r['node']:8.0f} {r['rembg']:8.0f} "
            f"{r['node_vs_rembg']:11.2f}  {r['node_without_png']:17.0f} "
            f"{r['rembg_without_png']:6.0f} {r['without_png_node_vs_rembg']:6.2f}  {parts_ms}"
        )
    targets = {
        "node_vs_rembg_server >= 2.0": ratios["node_vs_rembg_server"] >= 2.0,
        "node_vs_rembg_loop >= 2.0": ratios["node_vs_rembg_loop"] >= 2.0,
        "host CPU at 12 MP <= 1/3 of rembg's": float(host_table["12MP"]["node_vs_rembg"]) <= 1 / 3,  # type: ignore[arg-type]
    }
    print()
    for target, met in targets.items():
        print(f"  {'met' if met else 'NOT met'}: {target}")
    node_row = rows["node"]
    result = {
        "node_images_per_s": node,
        "runtime": node_row.get("runtime", ""),
        "precision": node_row.get("precision", ""),
        "threads": node_row.get("threads", 0),
        "raw_images_per_s": rows["raw"]["images_per_s"],
        "rembg_loop_images_per_s": rows["rembg_loop"]["images_per_s"],
        "rembg_pool_images_per_s": rows["rembg_pool"]["images_per_s"],
        "rembg_server_images_per_s": rows["rembg_server"]["images_per_s"],
        "device": device,
        "cpu_model": host.cpu_model,
        "cpu_flags": sorted(host.cpu_flags),
        "bf16_native": host.cpu_bf16,
        "ratios": ratios,
        "targets_met": targets,
        "host_cpu_ms_per_image": host_table,
        "parts": rows,
        "settings": vars(args),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cores": len(os.sched_getaffinity(0)),
            "providers": ort.get_available_providers(),
            "openvino": host.openvino_caps,
        },
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"node-{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
