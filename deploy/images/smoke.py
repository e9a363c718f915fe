"""Smoke test of the built images: a whole cluster in containers, a real photo, a node killed.

    .venv/bin/python deploy/images/smoke.py [--logs DIR] [--keep]      (or: make smoke)

Each part in its own container on the host network, the services on free
loopback ports (port 0, reported through CUTOUT_READY_FILE in a shared folder):
Redis (the redis-server the cutout image ships), two CPU inference nodes, the
scheduler and the gateway, all from the cutout image, the model copied into a
folder by the cutout-models image's own command.

Parity with Kubernetes: every container runs as the rendered `dev` overlay
(deploy/k8s, through tests/support/k8s_env.py) would run it: its command and args, its
environment as Kubernetes builds it (ConfigMaps, the Secrets cutout-redis and
cutout-internal given real values, $(VAR) expansion), its user, a read-only
root filesystem with /tmp as the manifests' emptyDir, all capabilities
dropped, no privilege escalation. What differs is named in HOST_NETWORK and
SMOKE_ONLY below (addresses, because here there are no pods or Service DNS
names) and checked by tests/cluster/test_deploy.py, which fails when the smoke test
would override anything else. The vendor is registered as docs/deploy.md says,
with `cutout-admin vendors add` run inside the scheduler's container. Redis runs
with the StatefulSet's arguments, from the cutout image's redis-server (the
cluster's redis:7 image is not reachable from CI). Checked from the host:

1. the images' shape: user 10001, no HEALTHCHECK, no model in the service image;
   cutout-gpu has onnxruntime-gpu (CUDAExecutionProvider) and no CPU onnxruntime;
2. grpc.health.v1 (what Kubernetes probes ask) SERVING on every service; a
   cutout-gpu node, which has no GPU here, refusing to start on the CPU;
3. `cutout submit astronaut.jpg --wait` with the CLI; the cutout's alpha against
   rembg.remove run here with the same model file: mean |difference| <= 1/255 and
   mask IoU >= 0.99 (measured 0.60/255: the node rounds the mask where rembg
   truncates it, see services/inference/masking.py; tests/cluster/test_e2e_real_model.py
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
import dataclasses
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
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from cutout import AsyncClient
from cutout.v1 import jobs_pb2

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # tests/support/k8s_env.py: the manifests as Kubernetes reads them
from tests.support import k8s_env  # noqa: E402

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
OVERLAY = "dev"  # the overlay whose containers the smoke test runs (local storage, no MySQL)

# What the smoke test sets differently from the environment the manifests give
# (tests/cluster/test_deploy.py fails when it would override anything else). Here every
# container shares the host's network: no pods, no Service DNS names.
HOST_NETWORK = {
    "CUTOUT_GATEWAY_LISTEN": "port 0 on loopback instead of the pod's 0.0.0.0:50051",
    "CUTOUT_SCHEDULER_LISTEN": "port 0 on loopback instead of the pod's 0.0.0.0:50052",
    "CUTOUT_NODE_LISTEN": "port 0 on loopback instead of the pod's 0.0.0.0:50061",
    "CUTOUT_METRICS_LISTEN": "off: two nodes on one network cannot both bind :9103",
    "CUTOUT_REDIS_URL": "the Service redis:6379 becomes Redis's loopback port; password kept",
    "CUTOUT_SCHEDULER_ADDR": "the Service scheduler:50052 becomes the scheduler's port",
    "CUTOUT_NODES": "the headless Service inference:50061 becomes the two nodes' ports",
}
SMOKE_ONLY = {
    "CUTOUT_READY_FILE": "how the smoke test learns the port each service bound",
    "CUTOUT_NODE_ID": "a pod's hostname names its node; host-network containers share one",
}


@dataclass(frozen=True)
class ManifestRun:
    """One container as the rendered manifests run it."""

    command: list[str]
    args: list[str]
    env: dict[str, str]
    user: str  # uid:gid from the pod's securityContext
    podman_security: list[str]  # the container's securityContext as podman options
    emptydirs: list[str]  # paths mounted from an emptyDir
    grace_s: int  # the pod's terminationGracePeriodSeconds


def security_options(container: k8s_env.Container) -> list[str]:
    """The container's securityContext as podman run options; unknown fields are an error,
    so a new setting in the manifests cannot be silently left out here."""
    context = dict(container.spec.get("securityContext", {}))
    options = []
    if context.pop("readOnlyRootFilesystem", False):
        options.append("--read-only")
    if context.pop("allowPrivilegeEscalation", True) is False:
        options += ["--security-opt", "no-new-privileges"]
    caps = context.pop("capabilities", {})
    options += [f"--cap-drop={c}" for c in caps.pop("drop", [])]
    options += [f"--cap-add={c}" for c in caps.pop("add", [])]
    context.pop("runAsNonRoot", None)  # checked: the images' user is 10001 (check_images)
    if context or caps:
        raise SmokeError(f"{container.name}: securityContext fields not mapped: {context, caps}")
    return options


def manifest_runs(secret_values: dict[str, dict[str, str]]) -> dict[str, ManifestRun]:
    """Container name -> how the OVERLAY's manifests run it, with these Secret values."""
    objects = k8s_env.render(OVERLAY)
    runs = {}
    for c in k8s_env.containers(objects):
        env = k8s_env.environment(c, objects, secret_values)
        pod = c.pod.get("securityContext", {})
        volumes = {v["name"]: v for v in c.pod.get("volumes", [])}  # not volumeClaimTemplates
        emptydirs = [
            m["mountPath"]
            for m in c.spec.get("volumeMounts", [])
            if "emptyDir" in volumes.get(m["name"], {})
        ]
        runs[c.name] = ManifestRun(
            command=[k8s_env.expand(a, env) for a in c.spec.get("command", [])],
            args=[k8s_env.expand(a, env) for a in c.spec.get("args", [])],
            env=env,
            user=f"{pod['runAsUser']}:{pod['runAsGroup']}",
            podman_security=security_options(c),
            emptydirs=emptydirs,
            grace_s=int(c.pod.get("terminationGracePeriodSeconds", 30)),
        )
    return runs


def service_env(run: ManifestRun, overrides: dict[str, str]) -> dict[str, str]:
    """The manifests' environment with the smoke test's overrides (only those it names)."""
    unknown = set(overrides) - set(HOST_NETWORK) - set(SMOKE_ONLY)
    if unknown:
        raise SmokeError(f"overrides not in HOST_NETWORK or SMOKE_ONLY: {sorted(unknown)}")
    return {**run.env, **overrides}


def loopback_redis_url(manifest_url: str, port: int) -> str:
    """The manifests' Redis URL (password and database kept) pointed at a loopback port."""
    head, at, tail = manifest_url.rpartition("@")
    host_port, slash, db = tail.partition("/")
    check(host_port == "redis:6379", f"unexpected Redis address in the manifests: {host_port}")
    return f"{head}{at}127.0.0.1:{port}{slash}{db}"


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
        manifest: ManifestRun | None = None,
    ) -> None:
        """podman run; with manifest, as Kubernetes would run that container: its
        command (instead of the image's entrypoint), user, securityContext and
        emptyDirs (tmpfs, unless a volume is mounted there)."""
        cmd = ["run", "-d", "--name", self.full(name), "--network", "host"]
        for key, value in (env or {}).items():
            cmd += ["--env", f"{key}={value}"]
        for host, inside in (volumes or {}).items():
            cmd += ["--volume", f"{host}:{inside}"]
        if manifest is not None:
            cmd += ["--user", manifest.user, *manifest.podman_security]
            mounted = {inside.removesuffix(":ro") for inside in (volumes or {}).values()}
            cmd += [f"--tmpfs={path}" for path in manifest.emptydirs if path not in mounted]
            if manifest.command:
                cmd += ["--entrypoint", json.dumps(manifest.command)]
        self.started.append(self.full(name))
        podman(*cmd, image, *args)

    def start_service(
        self,
        name: str,
        manifest: ManifestRun,
        overrides: dict[str, str],
        volumes: dict[Path, str] | None = None,
    ) -> None:
        """A Cutout service as the manifests run it, on a free loopback port (see wait_port)."""
        env = service_env(
            manifest,
            {**overrides, "CUTOUT_READY_FILE": f"/ready/{name}.port", "CUTOUT_METRICS_LISTEN": ""},
        )
        volumes = {**(volumes or {}), self.ready: "/ready"}
        self.run(name, self.images["cpu"], manifest.args, env, volumes, manifest)

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


def run_to_completion(cluster: Cluster, name: str, what: str, timeout_s: float = 120) -> None:
    code = cluster.wait_exit(name, timeout_s)
    check(code == 0, f"{what} exited with {code}: {cluster.logs(name)[-1500:]}")


def install_models(cluster: Cluster, runs: dict[str, ManifestRun], model_dir: Path) -> None:
    """The models init container, as the manifests run it."""
    models = runs["models"]
    cluster.run(
        "models", cluster.images["models"], models.args, {}, {cluster.models: "/target"}, models
    )
    run_to_completion(cluster, "models", "the models init container")
    wanted = sorted(p.name for p in model_dir.glob("*.onnx"))
    check(MODEL + ".onnx" in wanted, f"{MODEL}.onnx is not in {model_dir}")
    for name in wanted:
        copied = cluster.models / name
        check(copied.is_file(), f"{name} was not copied by the models image")
        check(sha256(copied) == sha256(model_dir / name), f"{name}: the copy differs")


def secret_values() -> dict[str, dict[str, str]]:
    """The Secrets docs/deploy.md has a user create (step 3), with fresh values."""
    return {
        "cutout-internal": {"token": secrets.token_urlsafe(24)},
        "cutout-redis": {"password": secrets.token_urlsafe(24)},
    }


def register_vendor(cluster: Cluster) -> str:
    """`cutout-admin vendors add` inside the scheduler's container, as docs/deploy.md
    does with kubectl exec; returns the API key it prints once."""
    out = podman("exec", cluster.full("scheduler"), "cutout-admin", "vendors", "add", "smoke")
    keys = [w for w in out.split() if w.startswith("ck_")]
    check(len(keys) == 1, f"cutout-admin vendors add printed no key: {out[-500:]}")
    return keys[0]


def start_cluster(cluster: Cluster, runs: dict[str, ManifestRun]) -> tuple[dict[str, int], str]:
    """Redis, two nodes, the migrate job, scheduler, gateway, each as the manifests run it;
    returns each service's port and a vendor's API key."""
    redis_port = free_port()
    redis = runs["redis"]
    # The StatefulSet's arguments (password, AOF), from the cutout image's redis-server,
    # on a free loopback port (the host's own Redis may have 6379).
    redis_args = ["redis", *redis.args, "--port", str(redis_port), "--bind", "127.0.0.1"]
    check("--requirepass" in redis.args, "the manifests' Redis has no password")
    # Its securityContext too, but the cutout image's own user and entrypoint.
    as_cutout = dataclasses.replace(redis, command=[], user=USER)
    volumes = {cluster.work / "redis": "/data"}
    cluster.run("redis", cluster.images["cpu"], redis_args, {}, volumes, as_cutout)
    redis_url = loopback_redis_url(runs["scheduler"].env["CUTOUT_REDIS_URL"], redis_port)
    # cutout-gpu's node, meanwhile: with no GPU it must refuse to start (see check_gpu_node).
    gpu_env = {
        "CUTOUT_REDIS_URL": redis_url,
        "CUTOUT_MODELS": MODEL,
        "CUTOUT_INTERNAL_TOKEN": runs["inference"].env["CUTOUT_INTERNAL_TOKEN"],
        "CUTOUT_NODE_LISTEN": "127.0.0.1:0",
        "CUTOUT_METRICS_LISTEN": "",
    }
    cluster.run(
        "gpu-node", cluster.images["gpu"], ["inference"], gpu_env, {cluster.models: "/models:ro"}
    )
    for name in ("node-1", "node-2"):  # both load the model at once
        numba = (
            cluster.work / f"numba-{name}"
        )  # each pod's own emptyDir, seeded by its init container
        numba.mkdir()
        os.chown(numba, 10001, 10001)
        seed = runs["numba-cache"]
        cluster.run(f"numba-{name}", cluster.images["cpu"], seed.args, {}, {numba: "/seed"}, seed)
        run_to_completion(cluster, f"numba-{name}", f"{name}'s numba-cache init container")
        cluster.start_service(
            name,
            runs["inference"],
            {"CUTOUT_NODE_LISTEN": "127.0.0.1:0", "CUTOUT_NODE_ID": f"smoke-{name}"},
            {cluster.models: "/models:ro", numba: "/var/cache/numba"},
        )
    ports = {name: cluster.wait_port(name) for name in ("node-1", "node-2")}
    migrate = runs["migrate"]
    cluster.run("migrate", cluster.images["cpu"], migrate.args, migrate.env, {}, migrate)
    run_to_completion(cluster, "migrate", "the migrate init container")
    cluster.start_service(
        "scheduler",
        runs["scheduler"],
        {
            "CUTOUT_REDIS_URL": redis_url,
            "CUTOUT_SCHEDULER_LISTEN": "127.0.0.1:0",
            "CUTOUT_NODES": f"127.0.0.1:{ports['node-1']},127.0.0.1:{ports['node-2']}",
        },
        {cluster.results: "/var/lib/cutout/results"},
    )
    ports["scheduler"] = cluster.wait_port("scheduler")
    cluster.start_service(
        "gateway",
        runs["gateway"],
        {
            "CUTOUT_REDIS_URL": redis_url,
            "CUTOUT_GATEWAY_LISTEN": "127.0.0.1:0",
            "CUTOUT_SCHEDULER_ADDR": f"127.0.0.1:{ports['scheduler']}",
        },
    )
    ports["gateway"] = cluster.wait_port("gateway")
    api_key = register_vendor(cluster)
    log(f"cluster up as the {OVERLAY} overlay runs it: {ports}, redis {redis_port}")
    return ports, api_key


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


def stop_all(cluster: Cluster, runs: dict[str, ManifestRun], killed: str) -> None:
    """SIGTERM in the order Kubernetes would drain: gateway first; each must exit 0 within
    its pod's terminationGracePeriodSeconds."""
    manifest = {"gateway": "gateway", "scheduler": "scheduler", "redis": "redis"}
    for name in ("gateway", "scheduler", "node-1", "node-2", "redis"):
        if name == killed:
            continue
        grace = runs[manifest.get(name, "inference")].grace_s
        podman("stop", "--time", str(grace), cluster.full(name), timeout=grace + 30)
        code = cluster.status(name)[1]
        check(code == 0, f"{name} exited with {code} on SIGTERM")


def smoke(args: argparse.Namespace, cluster: Cluster, work: Path) -> None:
    check_images(cluster.images)
    log("images: user, no HEALTHCHECK, no model in cutout, GPU providers: ok")
    runs = manifest_runs(secret_values())
    install_models(cluster, runs, args.model_dir)
    ports, api_key = start_cluster(cluster, runs)
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
    stop_all(cluster, runs, killed)


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
