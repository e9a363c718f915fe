"""Smoke test of the built images: a whole cluster in containers, a real photo, a node killed.

    .venv/bin/python deploy/images/smoke.py [--logs DIR] [--keep]      (or: make smoke)

Each part in its own container on the host network, the services on free
loopback ports (port 0, reported through CUTOUT_READY_FILE in a shared folder):
Redis (the redis-server the cutout image ships), two CPU inference nodes, the
scheduler and the gateway, all from the cutout image, the model copied into a
folder by the cutout-models image's own command. Checked from the host:

1. the images' shape: user 10001, no HEALTHCHECK, no model in the service image;
   cutout-gpu has onnxruntime-gpu (CUDAExecutionProvider) and no CPU onnxruntime;
2. grpc.health.v1 (what Kubernetes probes ask) SERVING on every service; a
   cutout-gpu node, which has no GPU here, refusing to start on the CPU;
3. `cutout submit astronaut.jpg --wait` with the CLI; the cutout's alpha against
   rembg.remove run here with the same model file: mean |difference| <= 1/255 and
   mask IoU >= 0.99 (measured 0.60/255: the node rounds the mask where rembg
   truncates it, see services/inference/masking.py; tests/test_e2e_real_model.py
   allows 2/255 across three photos);
4. a job (the photo at 3072x3072, so that it runs for seconds) whose node is
   killed (`podman kill`) while it runs still succeeds, on the other node, in a
   second attempt, with the same alpha as rembg's;
5. every service stops on SIGTERM with exit status 0.

Any failure exits 1 and leaves each container's log and `podman inspect` in
--logs (default var/smoke-logs). Missing podman or images fail; nothing skips.
It is a script, not a pytest test, so that `make test` still runs where there
is no podman (a test there could only fail or skip); CI runs it after the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from cutout import AsyncClient
from cutout.v1 import jobs_pb2

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "deploy" / "images"
MODEL = "isnet-general-use"
USER = "10001:10001"
MAX_ALPHA_MAE = 1.0  # out of 255
MIN_IOU = 0.99
# A node loads its model in seconds alone; on a 2-core box shared with other
# work, two nodes loading at once have taken far longer.
READY_TIMEOUT_S = 180
JOB_TIMEOUT_S = 300
SERVICES = ("node-1", "node-2", "scheduler", "gateway")


class SmokeError(AssertionError):
    """What the smoke test found wrong."""


def log(message: str) -> None:
    print(f"smoke: {message}", file=sys.stderr, flush=True)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeError(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def podman(*args: str, timeout: float = 120, check_rc: bool = True) -> str:
    proc = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check_rc and proc.returncode != 0:
        raise SmokeError(f"podman {' '.join(args[:4])} ...: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def image_names() -> dict[str, str]:
    """The references `make images` built (build.sh is where they are named)."""
    out = subprocess.run(
        [str(HERE / "build.sh"), "names"], capture_output=True, text=True, check=True
    ).stdout.split()
    return dict(zip(("cpu", "gpu", "models"), out, strict=True))


class Cluster:
    """The containers of one run, by short name; all removed at the end."""

    def __init__(self, images: dict[str, str], work: Path) -> None:
        self.images = images
        self.work = work
        self.prefix = f"cutout-smoke-{os.getpid()}"
        self.started: list[str] = []
        self.ready = work / "ready"
        self.models = work / "models"
        self.results = work / "results"
        for folder in (self.ready, self.models, self.results, work / "redis"):
            folder.mkdir(parents=True)
            os.chown(folder, 10001, 10001)  # the images' user writes there

    def full(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def run(
        self,
        name: str,
        image: str,
        args: list[str],
        env: dict[str, str] | None = None,
        volumes: dict[Path, str] | None = None,
    ) -> None:
        cmd = ["run", "-d", "--name", self.full(name), "--network", "host"]
        for key, value in (env or {}).items():
            cmd += ["--env", f"{key}={value}"]
        for host, inside in (volumes or {}).items():
            cmd += ["--volume", f"{host}:{inside}"]
        self.started.append(self.full(name))
        podman(*cmd, image, *args)

    def start_service(self, name: str, part: str, env: dict[str, str]) -> None:
        """A Cutout service on a free loopback port (see wait_port)."""
        env = {
            **env,
            "CUTOUT_READY_FILE": f"/ready/{name}.port",
            "CUTOUT_METRICS_LISTEN": "",  # two nodes share the host network: no fixed ports
        }
        volumes = {
            self.ready: "/ready",
            self.models: "/models:ro",
            self.results: "/var/lib/cutout/results",
        }
        self.run(name, self.images["cpu"], [part], env, volumes)

    def wait_port(self, name: str) -> int:
        ready = self.ready / f"{name}.port"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (ready.exists() and ready.read_text().strip()):
            check(self.status(name)[0] == "running", f"{name} exited before it was ready")
            check(time.monotonic() < deadline, f"{name} not ready after {READY_TIMEOUT_S} s")
            time.sleep(0.2)
        return int(ready.read_text())

    def status(self, name: str) -> tuple[str, int]:
        out = podman(
            "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.full(name)
        )
        state, code = out.split()
        return state, int(code)

    def wait_exit(self, name: str, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while (status := self.status(name))[0] != "exited":
            check(time.monotonic() < deadline, f"{name} still {status[0]} after {timeout_s} s")
            time.sleep(0.2)
        return status[1]

    def logs(self, name: str) -> str:
        """What the container wrote, stdout and stderr interleaved."""
        return subprocess.run(
            ["podman", "logs", self.full(name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        ).stdout

    def collect_logs(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for full in self.started:
            name = full.removeprefix(self.prefix + "-")
            (dest / f"{name}.log").write_text(self.logs(name))
            (dest / f"{name}.inspect.json").write_text(podman("inspect", full, check_rc=False))

    def remove(self) -> None:
        if self.started:
            podman("rm", "--force", "--time", "0", *self.started, check_rc=False)


def check_images(images: dict[str, str]) -> None:
    for ref in images.values():
        exists = subprocess.run(["podman", "image", "exists", ref], check=False).returncode
        check(exists == 0, f"image {ref} is missing: run `make images`")
        user, health = (
            podman("image", "inspect", "--format", "{{.Config.User}}|{{.Config.Healthcheck}}", ref)
            .strip()
            .split("|")
        )
        check(user == USER, f"{ref} runs as {user!r}, not {USER}")
        check(health in ("", "<nil>"), f"{ref} has a HEALTHCHECK: {health}")
    find_models = "find / -xdev -name '*.onnx' -size +1M 2>/dev/null; exit 0"  # not ORT's samples
    baked = podman("run", "--rm", "--entrypoint", "sh", images["cpu"], "-c", find_models)
    check(not baked.strip(), f"the service image contains models: {baked.split()}")
    probe = (
        "import importlib.metadata as md, json, onnxruntime as ort; "
        "from onnxruntime.capi import build_and_package_info as info; "
        "print(json.dumps([ort.get_available_providers(), info.cuda_version, "
        "sorted(d.metadata['Name'].lower() for d in md.distributions())]))"
    )
    providers, cuda, dists = json.loads(
        podman("run", "--rm", "--entrypoint", "python", images["gpu"], "-c", probe)
    )
    onnx = [d for d in dists if "onnx" in d]
    log(f"cutout-gpu: providers {providers}, distributions {onnx}, built for CUDA {cuda}")
    check("CUDAExecutionProvider" in providers, f"cutout-gpu has no CUDA provider: {providers}")
    check("onnxruntime-gpu" in dists, f"cutout-gpu has no onnxruntime-gpu: {onnx}")
    check("onnxruntime" not in dists, f"cutout-gpu also has the CPU onnxruntime: {onnx}")


def install_models(cluster: Cluster, model_dir: Path) -> None:
    """The models image's command, as the init container runs it."""
    cluster.run(
        "models", cluster.images["models"], ["/target"], volumes={cluster.models: "/target"}
    )
    code = cluster.wait_exit("models", 120)
    check(code == 0, f"the models image's copy exited with {code}")
    wanted = sorted(p.name for p in model_dir.glob("*.onnx"))
    check(MODEL + ".onnx" in wanted, f"{MODEL}.onnx is not in {model_dir}")
    for name in wanted:
        copied = cluster.models / name
        check(copied.is_file(), f"{name} was not copied by the models image")
        check(sha256(copied) == sha256(model_dir / name), f"{name}: the copy differs")


def start_cluster(cluster: Cluster, api_key: str) -> dict[str, int]:
    """Redis, two nodes, scheduler, gateway; returns each service's port."""
    redis_port = free_port()
    cluster.run(
        "redis",
        cluster.images["cpu"],
        [
            "redis",
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            "/data",
            "--appendonly",
            "yes",
            "--save",
            "",
        ],
        volumes={cluster.work / "redis": "/data"},
    )
    common = {
        "CUTOUT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "CUTOUT_MODELS": MODEL,
        # The shared secret of the calls between the services (docs/configuration.md).
        "CUTOUT_INTERNAL_TOKEN": secrets.token_urlsafe(24),
    }
    # cutout-gpu's node, meanwhile: with no GPU it must refuse to start (see check_gpu_node).
    cluster.run(
        "gpu-node",
        cluster.images["gpu"],
        ["inference"],
        {**common, "CUTOUT_NODE_LISTEN": "127.0.0.1:0", "CUTOUT_METRICS_LISTEN": ""},
        {cluster.models: "/models:ro"},
    )
    for name in ("node-1", "node-2"):  # both load the model at once
        cluster.start_service(
            name,
            "inference",
            {
                **common,
                "CUTOUT_NODE_LISTEN": "127.0.0.1:0",
                "CUTOUT_NODE_ID": f"smoke-{name}",
                "CUTOUT_ORT_THREADS": "1",
            },
        )
    ports = {name: cluster.wait_port(name) for name in ("node-1", "node-2")}
    cluster.start_service(
        "scheduler",
        "scheduler",
        {
            **common,
            "CUTOUT_SCHEDULER_LISTEN": "127.0.0.1:0",
            "CUTOUT_NODES": f"127.0.0.1:{ports['node-1']},127.0.0.1:{ports['node-2']}",
            "CUTOUT_NODE_POLL_S": "0.2",
            "CUTOUT_RETRY_BASE_MS": "200",
        },
    )
    ports["scheduler"] = cluster.wait_port("scheduler")
    cluster.start_service(
        "gateway",
        "gateway",
        {
            **common,
            "CUTOUT_GATEWAY_LISTEN": "127.0.0.1:0",
            "CUTOUT_SCHEDULER_ADDR": f"127.0.0.1:{ports['scheduler']}",
            "CUTOUT_API_KEYS": f"smoke:{hashlib.sha256(api_key.encode()).hexdigest()}",
        },
    )
    ports["gateway"] = cluster.wait_port("gateway")
    log(f"cluster up: {ports}, redis {redis_port}")
    return ports


def check_gpu_node(cluster: Cluster) -> None:
    """cutout-gpu's node on a machine without a GPU: it imports the server, tries to load
    the model on CUDA, and exits instead of serving from the CPU."""
    code = cluster.wait_exit("gpu-node", READY_TIMEOUT_S)
    logs = cluster.logs("gpu-node")
    check(code != 0, "cutout-gpu's node started without a GPU")
    broken = [e for e in ("ImportError", "ModuleNotFoundError", "SettingsError") if e in logs]
    check(not broken, f"cutout-gpu's node is broken ({broken}): {logs[-1500:]}")
    check("CUDAExecutionProvider" in logs, f"cutout-gpu's node never tried CUDA: {logs[-1500:]}")
    log(f"cutout-gpu's node without a GPU: tried CUDA, refused the CPU, exit {code}")


def check_health(ports: dict[str, int]) -> None:
    for name, port in ports.items():
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
        check(reply.status == health_pb2.HealthCheckResponse.SERVING, f"{name}: {reply.status}")


def alpha(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    check(image.format == "PNG" and image.mode == "RGBA", f"not an RGBA PNG: {image.mode}")
    return np.asarray(image.getchannel("A"), dtype=np.float64)


def compare(name: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    check(ours.shape == theirs.shape, f"{name}: size {ours.shape} != rembg's {theirs.shape}")
    mae = float(np.abs(ours - theirs).mean())
    union = ((ours > 127.5) | (theirs > 127.5)).sum()
    iou = float(((ours > 127.5) & (theirs > 127.5)).sum() / max(union, 1))
    log(f"{name}: mean |alpha - rembg alpha| {mae:.3f}/255, mask IoU {iou:.5f}")
    check(mae <= MAX_ALPHA_MAE, f"{name}: mean alpha difference {mae:.3f}/255 > {MAX_ALPHA_MAE}")
    check(iou >= MIN_IOU, f"{name}: mask IoU {iou:.4f} < {MIN_IOU}")
    check(0.1 < float((ours > 127).mean()) < 0.9, f"{name}: a trivial mask")


def rembg_alpha(model_dir: Path, data: bytes) -> np.ndarray:
    """rembg.remove here on the host, with the model file the models image delivered."""
    os.environ["U2NET_HOME"] = str(model_dir)
    from rembg import new_session, remove

    out = remove(data, session=new_session(MODEL))
    assert isinstance(out, bytes)
    return alpha(out)


def submit_with_cli(addr: str, api_key: str, photo: Path, out_dir: Path) -> bytes:
    env = {**os.environ, "CUTOUT_ADDR": addr, "CUTOUT_API_KEY": api_key}
    cli = Path(sys.executable).with_name("cutout")
    cmd = [str(cli), "submit", str(photo), "--wait", "--out", str(out_dir)]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False
    )
    check(proc.returncode == 0, f"cutout submit exited {proc.returncode}: {proc.stderr[-2000:]}")
    result = out_dir / f"{photo.stem}.png"
    check(result.is_file(), f"cutout submit --wait saved no {result}: {proc.stderr[-2000:]}")
    return result.read_bytes()


async def job_through_node_kill(
    cluster: Cluster, ports: dict[str, int], api_key: str, data: bytes
) -> tuple[jobs_pb2.Job, bytes, str]:
    """Submit; kill the node running it; return the final job, its output, the killed node."""
    addr = f"127.0.0.1:{ports['gateway']}"
    # A job names its node by the address the scheduler dials.
    nodes = {f"127.0.0.1:{ports[name]}": name for name in ("node-1", "node-2")}
    killed = ""
    final: jobs_pb2.Job | None = None
    async with AsyncClient(addr, api_key) as client:
        job = await client.submit(data)
        async with asyncio.timeout(JOB_TIMEOUT_S):
            async for event in client.watch(job.name):
                final = event.job
                if not killed and final.state == jobs_pb2.JOB_STATE_RUNNING and final.node:
                    killed = nodes[final.node]
                    stage = jobs_pb2.Stage.Name(final.stage)
                    log(f"{job.name} running on {final.node} ({stage}): podman kill")
                    podman("kill", cluster.full(killed))
        assert final is not None
        output = b""
        if final.state == jobs_pb2.JOB_STATE_SUCCEEDED:
            _, output = await client.result(job.name)
    return final, output, killed


def check_node_kill(
    cluster: Cluster, ports: dict[str, int], api_key: str, data: bytes
) -> np.ndarray:
    final, output, killed = asyncio.run(job_through_node_kill(cluster, ports, api_key, data))
    check(killed in ("node-1", "node-2"), f"the job never showed a running node ({killed!r})")
    check(cluster.status(killed)[0] == "exited", f"{killed} still runs after podman kill")
    state = jobs_pb2.JobState.Name(final.state)
    check(
        final.state == jobs_pb2.JOB_STATE_SUCCEEDED,
        f"after killing {killed}: {state} {final.error.message}",
    )
    check(
        final.node != f"127.0.0.1:{ports[killed]}", f"the job finished on {killed} before the kill"
    )
    check(final.attempt >= 2, f"the job succeeded in attempt {final.attempt}, not a retry")
    log(f"after killing {killed}: succeeded on {final.node} in attempt {final.attempt}")
    return alpha(output)


def stop_all(cluster: Cluster, killed: str) -> None:
    """SIGTERM in the order Kubernetes would drain: gateway first; each must exit 0."""
    for name in ("gateway", "scheduler", "node-1", "node-2", "redis"):
        if name == killed:
            continue
        podman("stop", "--time", "40", cluster.full(name), timeout=60)
        code = cluster.status(name)[1]
        check(code == 0, f"{name} exited with {code} on SIGTERM")


def smoke(args: argparse.Namespace, cluster: Cluster, work: Path) -> None:
    check_images(cluster.images)
    log("images: user, no HEALTHCHECK, no model in cutout, GPU providers: ok")
    install_models(cluster, args.model_dir)
    api_key = "ck_" + secrets.token_urlsafe(32)
    ports = start_cluster(cluster, api_key)
    check_health({name: ports[name] for name in SERVICES})
    check_gpu_node(cluster)
    addr = f"127.0.0.1:{ports['gateway']}"

    import skimage.data

    photo = work / "astronaut.jpg"
    astronaut = skimage.data.astronaut()  # type: ignore[no-untyped-call]
    Image.fromarray(astronaut).save(photo, "JPEG", quality=92)
    data = photo.read_bytes()
    theirs = rembg_alpha(cluster.models, data)
    started = time.monotonic()
    ours = alpha(submit_with_cli(addr, api_key, photo, work / "out"))
    log(f"cutout submit --wait: {time.monotonic() - started:.1f} s")
    compare("astronaut via the CLI", ours, theirs)

    # The same photo at 3072x3072 for the kill: its decode, mask resize and PNG
    # encode keep the job running for seconds, so the kill lands while it runs
    # (at 512x512 a node with OpenVINO can finish in about a second).
    big = io.BytesIO()
    Image.fromarray(astronaut).resize((3072, 3072), Image.Resampling.LANCZOS).save(
        big, "JPEG", quality=92
    )
    ours = check_node_kill(cluster, ports, api_key, big.getvalue())
    compare(
        "astronaut 3072x3072 through a node kill", ours, rembg_alpha(cluster.models, big.getvalue())
    )
    killed = next(n for n in ("node-1", "node-2") if cluster.status(n)[0] == "exited")
    stop_all(cluster, killed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--logs",
        type=Path,
        default=ROOT / "var" / "smoke-logs",
        help="where containers' logs go on failure (default var/smoke-logs)",
    )
    parser.add_argument("--keep", action="store_true", help="leave the containers running")
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="the models cutout-models was built from (default as build.sh)",
    )
    args = parser.parse_args()
    # gRPC honours http_proxy; loopback calls must never go through one.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
        os.environ.pop(var, None)
    os.environ["no_proxy"] = "127.0.0.1,localhost"
    os.environ.setdefault("CONTAINERS_CONF", str(HERE / "containers.conf"))
    if shutil.which("podman") is None:
        log("FAILED: podman is not installed (deploy/images/setup-host.sh installs it)")
        return 1
    if args.model_dir is None:
        default = os.environ.get("MODEL_DIR") or os.environ.get("CUTOUT_MODEL_DIR")
        args.model_dir = Path(default) if default else ROOT.parent / "shared" / "models"

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="cutout-smoke-"))
    cluster = Cluster(image_names(), work)
    try:
        smoke(args, cluster, work)
    except (SmokeError, subprocess.SubprocessError, grpc.RpcError, TimeoutError) as exc:
        shutil.rmtree(args.logs, ignore_errors=True)
        cluster.collect_logs(args.logs)
        log(f"FAILED after {time.monotonic() - started:.0f} s: {exc}")
        log(f"logs of every container: {args.logs}")
        return 1
    finally:
        if not args.keep:
            cluster.remove()
            shutil.rmtree(work, ignore_errors=True)
    log(f"passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
