"""A whole Cutout cluster as local processes: what `cutout-admin up`, the demo and the tests run.

Each service runs as `python -m services.<name>` with its settings in its
environment and listens on a port it picks itself (reported through a ready
file), except the public port, which the caller chooses: Envoy's when the
cluster has one in front of its gateway replicas, else the first gateway's.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import PROJECT_ROOT, default_model_dir
from services.common.internal_auth import new_token
from services.gateway.auth import hash_key
from services.gateway.ratelimit import GENEROUS
from services.local.envoy import EnvoyProcess
from services.local.redis import RedisServer, free_port
from services.local.supervisor import Backoff, Echo, Supervisor


@dataclass
class Service:
    name: str
    module: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    metrics_port: int = 0
    ready_file: Path | None = None  # written by the process once it serves

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def exit_code(self) -> int | None:
        """The process's exit status once it has exited (negative: the signal), else None."""
        return self.proc.poll() if self.proc is not None else None

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


@dataclass
class ClusterConfig:
    """How to lay out a local cluster.

    Attributes:
        nodes: inference nodes to start.
        gateway_port: port of the public API (0 picks a free one): Envoy's when `envoy`
            is on, else the first gateway's.
        gateways: gateway replicas to start (the others pick free ports).
        envoy: put Envoy (deploy/envoy/envoy.yaml, rendered for loopback) in front of the
            gateways; its address is then the cluster's public address.
        envoy_admin_port: port of Envoy's admin API and /stats/prometheus (0 picks one).
        workdir: where Redis data, results, logs and the local key live.
        redis_url: use this Redis instead of starting one.
        model_dir: folder of *.onnx models.
        models: model names to load (every *.onnx in model_dir when empty).
        api_keys: {vendor: key} the gateway accepts.
        extra_env: more settings for every service (CUTOUT_LEASE_MS, ...).
        appendfsync: AOF fsync policy of the embedded Redis ("everysec" or "always").
        rate_limits: CUTOUT_RATE_LIMITS of the gateway; generous by default (a local
            cluster is not where quotas matter, but the limiter still runs).
        dns_nodes: give the scheduler `dns:///localhost:PORT` instead of the node list,
            so it finds its (single) node through a DNS lookup as in Kubernetes.
        internal_token: CUTOUT_INTERNAL_TOKEN shared by the services (a fresh random one
            per cluster unless given).
        supervise: restart the scheduler(s), nodes and gateways when their process exits
            while the cluster is up, on the same address (services/local/supervisor.py).
            Off by default: tests kill processes and expect them to stay dead.
        backoff: when the supervisor restarts a process that exited.
    """

    nodes: int = 2
    gateway_port: int = 50051
    gateways: int = 1
    envoy: bool = False
    envoy_admin_port: int = 0
    workdir: Path = field(default_factory=lambda: PROJECT_ROOT / "var")
    redis_url: str = ""
    model_dir: Path = field(default_factory=default_model_dir)
    models: list[str] = field(default_factory=list)
    api_keys: dict[str, str] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    appendfsync: str = "everysec"
    dns_nodes: bool = False
    rate_limits: str = GENEROUS
    internal_token: str = field(default_factory=new_token)
    supervise: bool = False
    backoff: Backoff = field(default_factory=Backoff)


class LocalCluster:
    def __init__(self, config: ClusterConfig, echo: Echo | None = None) -> None:
        """`echo` receives the supervisor's lines (restarts), when `config.supervise` is on."""
        self.config = config
        self.echo = echo
        self.supervisor: Supervisor | None = None
        self.workdir = config.workdir
        self.redis: RedisServer | None = None
        self.redis_url = config.redis_url
        self.scheduler: Service | None = None
        self.extra_schedulers: list[Service] = []
        self.nodes: list[Service] = []
        self.gateways: list[Service] = []
        self.envoy: EnvoyProcess | None = None
        self.models = config.models or sorted(p.stem for p in config.model_dir.glob("*.onnx"))
        if not self.models:
            raise FileNotFoundError(f"no *.onnx model in {config.model_dir} (set CUTOUT_MODEL_DIR)")
        # Where the services write their ready files: made by the first spawn, removed
        # by stop() (a cluster that never starts leaves nothing in the temporary folder).
        self._ready_dir: Path | None = None
        self._node_ports: list[int] = []

    # --- environment -----------------------------------------------------------

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "CUTOUT_REDIS_URL": self.redis_url,
                "CUTOUT_MODEL_DIR": str(self.config.model_dir),
                "CUTOUT_MODELS": ",".join(self.models),
                "CUTOUT_STORAGE_DIR": str(self.workdir / "results"),
                "CUTOUT_INTERNAL_TOKEN": self.config.internal_token,
                "PYTHONPATH": os.pathsep.join(
                    [str(PROJECT_ROOT), str(PROJECT_ROOT / "clients" / "python")]
                ),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.config.extra_env)
        return env

    def _service(self, name: str, module: str, env: dict[str, str]) -> Service:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        metrics_port = free_port()  # each process serves its own /metrics
        env = {**env, "CUTOUT_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"}
        return Service(name, module, env, logs / f"{name}.log", metrics_port=metrics_port)

    def _ready_path(self, svc: Service) -> Path:
        if self._ready_dir is None:
            self._ready_dir = Path(tempfile.mkdtemp(prefix="cutout-ready-"))
        return self._ready_dir / f"{svc.name}.port"

    def _spawn(self, svc: Service) -> None:
        ready = self._ready_path(svc)
        ready.unlink(missing_ok=True)
        svc.ready_file = ready
        env = {**svc.env, "CUTOUT_READY_FILE": str(ready)}
        with svc.log_path.open("ab") as log:
            svc.proc = subprocess.Popen(
                [sys.executable, "-m", svc.module],
                env=env,
                cwd=PROJECT_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a terminal reaches only `cutout-admin up`
            )

    def _wait_ready(self, svc: Service, timeout_s: float) -> None:
        ready = svc.ready_file
        assert ready is not None, f"{svc.name} was never started"
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            assert svc.proc is not None
            if svc.proc.poll() is not None:
                tail = svc.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(
                    f"{svc.name} exited with {svc.proc.returncode}; its log ends:\n{tail}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{svc.name} not ready after {timeout_s}s; see {svc.log_path}")
            time.sleep(0.05)
        svc.port = int(ready.read_text())

    # --- lifecycle ----------------------------------------------------------------

    def start(self, timeout_s: float = 180.0, start_nodes: bool = True) -> None:
        try:
            if not self.redis_url:
                self.redis = RedisServer(
                    self.workdir / "redis", appendfsync=self.config.appendfsync
                )
                self.redis.start()
                self.redis_url = self.redis.url
            # Node ports first, so the scheduler knows where to look even
            # before the nodes are up (a job waits until one is).
            self._node_ports = [free_port() for _ in range(self.config.nodes)]
            self.start_scheduler(timeout_s)
            for i in range(self.config.nodes if start_nodes else 0):
                self.start_node(i, wait=False)
            for node in self.nodes:
                self._wait_ready(node, timeout_s)
            for i in range(self.config.gateways):
                self.start_gateway(i, wait=False)
            for gateway in self.gateways:
                self._wait_ready(gateway, timeout_s)
            if self.config.envoy:
                self.start_envoy(timeout_s)
            if self.config.supervise:
                self.supervisor = Supervisor(
                    self.workdir / "logs" / "supervisor.log", self.config.backoff, self.echo
                )
                for svc in [self.scheduler, *self.extra_schedulers, *self.nodes, *self.gateways]:
                    if svc is not None:
                        self.supervisor.watch(svc, functools.partial(self.respawn, svc))
                self.supervisor.start()
        except BaseException:
            self.stop()
            raise

    def _scheduler_env(self) -> dict[str, str]:
        env = self._base_env()
        if self.config.dns_nodes:
            if len(self._node_ports) != 1:
                raise ValueError("dns_nodes needs exactly one node (localhost has one address)")
            nodes = f"dns:///localhost:{self._node_ports[0]}"
        else:
            nodes = ",".join(f"127.0.0.1:{p}" for p in self._node_ports)
        env.update({"CUTOUT_SCHEDULER_LISTEN": "127.0.0.1:0", "CUTOUT_NODES": nodes})
        return env

    def add_scheduler(self, timeout_s: float = 60.0) -> Service:
        """Another scheduler replica on the same Redis and nodes (not behind the gateway)."""
        name = f"scheduler-{len(self.extra_schedulers) + 2}"
        svc = self._service(name, "services.scheduler", self._scheduler_env())
        self.extra_schedulers.append(svc)
        self._spawn(svc)
        self._wait_ready(svc, timeout_s)
        if self.supervisor is not None:
            self.supervisor.watch(svc, functools.partial(self.respawn, svc))
        return svc

    def respawn(self, svc: Service) -> None:
        """Start a service's process again on the address it had, without waiting for it."""
        listen = {
            "services.scheduler": "CUTOUT_SCHEDULER_LISTEN",
            "services.gateway": "CUTOUT_GATEWAY_LISTEN",
            "services.inference": "CUTOUT_NODE_LISTEN",
        }[svc.module]
        if svc.port:
            svc.env[listen] = svc.address
        self._spawn(svc)

    def start_scheduler(self, timeout_s: float = 60.0) -> Service:
        env = self._scheduler_env()
        if self.scheduler is None:
            self.scheduler = self._service("scheduler", "services.scheduler", env)
        elif self.scheduler.port:
            # A restart keeps its address so the gateway's channel reconnects to it.
            self.scheduler.env["CUTOUT_SCHEDULER_LISTEN"] = self.scheduler.address
        self._spawn(self.scheduler)
        self._wait_ready(self.scheduler, timeout_s)
        return self.scheduler

    def start_node(self, index: int, wait: bool = True, timeout_s: float = 180.0) -> Service:
        env = self._base_env()
        threads = max(1, (os.cpu_count() or 1) // max(1, self.config.nodes))
        env.setdefault("CUTOUT_ORT_THREADS", str(threads))
        env.update(
            {
                "CUTOUT_NODE_LISTEN": f"127.0.0.1:{self._node_ports[index]}",
                "CUTOUT_NODE_ID": f"node-{index + 1}",
            }
        )
        while len(self.nodes) <= index:
            self.nodes.append(
                self._service(f"node-{len(self.nodes) + 1}", "services.inference", env)
            )
        node = self.nodes[index]
        self._spawn(node)
        if wait:
            self._wait_ready(node, timeout_s)
        return node

    def start_gateway(self, index: int = 0, wait: bool = True, timeout_s: float = 60.0) -> Service:
        """Gateway replica `index`; started again, it keeps its address (Envoy's upstream)."""
        assert self.scheduler is not None
        if index < len(self.gateways):
            gateway = self.gateways[index]
            if gateway.port:
                gateway.env["CUTOUT_GATEWAY_LISTEN"] = gateway.address
            self._spawn(gateway)
            if wait:
                self._wait_ready(gateway, timeout_s)
            return gateway
        public = index == 0 and not self.config.envoy
        port = self.config.gateway_port if public else 0
        env = self._base_env()
        env.update(
            {
                "CUTOUT_GATEWAY_LISTEN": f"127.0.0.1:{port}",
                "CUTOUT_RATE_LIMITS": self.config.rate_limits,
                "CUTOUT_SCHEDULER_ADDR": self.scheduler.address,
                "CUTOUT_API_KEYS": ",".join(
                    f"{v}:{hash_key(k)}" for v, k in self.config.api_keys.items()
                ),
            }
        )
        name = "gateway" if index == 0 else f"gateway-{index + 1}"
        gateway = self._service(name, "services.gateway", env)
        self.gateways.append(gateway)
        self._spawn(gateway)
        if wait:
            self._wait_ready(gateway, timeout_s)
        return gateway

    def start_envoy(self, timeout_s: float = 60.0) -> EnvoyProcess:
        """Envoy on the public port, balancing over every gateway; returns once all are healthy."""
        self.envoy = EnvoyProcess(
            self.workdir,
            [g.address for g in self.gateways],
            port=self.config.gateway_port,
            admin_port=self.config.envoy_admin_port,
        )
        self.envoy.start(timeout_s)
        return self.envoy

    @staticmethod
    def kill(svc: Service) -> None:
        """SIGKILL, as a crash would."""
        if svc.proc and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait()

    @staticmethod
    def terminate(svc: Service, timeout_s: float = 40.0) -> None:
        """SIGTERM, then wait for the service's graceful stop."""
        if svc.proc and svc.proc.poll() is None:
            svc.proc.send_signal(signal.SIGTERM)
            try:
                svc.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                svc.proc.kill()
                svc.proc.wait()

    def stop(self) -> None:
        """Envoy and the gateways first (no new work), then scheduler, nodes, Redis.

        The supervisor stops first, so none of these stops is taken for a crash.
        The folder of ready files goes last, whatever failed before.
        """
        try:
            if self.supervisor is not None:
                self.supervisor.stop()
            if self.envoy:
                self.envoy.stop()
            for gateway in self.gateways:
                self.terminate(gateway)
            for scheduler in [self.scheduler, *self.extra_schedulers]:
                if scheduler:
                    self.terminate(scheduler)
            for node in self.nodes:
                self.terminate(node)
            if self.redis:
                self.redis.stop()
        finally:
            if self._ready_dir is not None:
                shutil.rmtree(self._ready_dir, ignore_errors=True)
                self._ready_dir = None

    @property
    def gateway(self) -> Service | None:
        """The first gateway replica."""
        return self.gateways[0] if self.gateways else None

    @property
    def gateway_address(self) -> str:
        """The first gateway's own address (bypassing Envoy)."""
        assert self.gateway is not None
        return self.gateway.address

    @property
    def public_address(self) -> str:
        """Where clients connect: Envoy when it is on, else the first gateway."""
        if self.envoy is not None:
            return self.envoy.address
        return self.gateway_address
