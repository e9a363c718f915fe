"""`cutout-admin up`: a local cluster on embedded defaults, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

from rich.console import Console

from services.common.config import PROJECT_ROOT
from services.gateway.auth import new_key
from services.local.cluster import ClusterConfig, LocalCluster
from services.local.envoy import envoy_binary
from services.local.webpage import WebPage
from services.scheduler.migrate import migrate
from services.scheduler.records import MysqlTarget

console = Console(soft_wrap=True)


def local_key(workdir: Path) -> str:
    """The local vendor's key, made once and kept in <workdir>/local.key (mode 0600)."""
    path = workdir / "local.key"
    if path.exists():
        return path.read_text().strip()
    workdir.mkdir(parents=True, exist_ok=True)
    key = new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def run_up(
    nodes: int,
    port: int,
    workdir: Path | None,
    appendfsync: str = "everysec",
    envoy: bool = True,
    gateways: int = 2,
    envoy_admin_port: int = 9901,
    web_port: int = 8000,
) -> int:
    """Run the cluster until Ctrl-C or SIGTERM; `port` is the public one (Envoy's when on)."""
    workdir = workdir or PROJECT_ROOT / "var"
    if envoy:
        try:
            envoy_binary()
        except FileNotFoundError as exc:
            console.print(f"{exc} (or run without it: cutout-admin up --no-envoy)", markup=False)
            return 1
    elif gateways != 1:
        console.print("without Envoy only one gateway can serve the public port: --gateways 1")
        return 2
    key = local_key(workdir)
    config = ClusterConfig(
        nodes=nodes,
        gateway_port=port,
        gateways=gateways,
        envoy=envoy,
        envoy_admin_port=envoy_admin_port,
        workdir=workdir,
        redis_url=os.environ.get("CUTOUT_REDIS_URL", ""),
        api_keys={"local": key},
        appendfsync=appendfsync,
        supervise=True,  # a crashed service comes back on its address (logs/supervisor.log)
    )
    cluster = LocalCluster(config, echo=lambda line: console.print(line, markup=False))
    mysql_url = os.environ.get("CUTOUT_MYSQL_URL", "")
    if mysql_url:  # records database configured: bring its schema up to date first
        applied = asyncio.run(migrate(MysqlTarget.from_url(mysql_url)))
        console.print(f"data_records migrations applied: {', '.join(applied) or 'none needed'}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    front = f"{gateways} gateway(s) behind Envoy" if envoy else "the gateway"
    page = None
    try:  # whatever happens from here, the cluster stops (its processes, its ready folder)
        with console.status(
            f"starting redis, scheduler, {nodes} node(s), {front} (models load first)..."
        ):
            cluster.start()
        # Where `cutout-admin vendors` finds this cluster's registry when run from here.
        (workdir / "redis.url").write_text(cluster.redis_url + "\n")
        if envoy and web_port >= 0:  # the page speaks gRPC-Web, which only Envoy serves
            try:
                page = WebPage(f"http://{cluster.public_address}", port=web_port).start()
            except (FileNotFoundError, OSError) as exc:
                console.print(f"no web page: {exc}", markup=False)
        print_summary(cluster, key)
        if page is not None:
            console.print(f"  web page   {page.url}   (paste the API key above)")
        stop.wait()
        console.print("stopping...")
    finally:
        if page is not None:
            page.stop()
        cluster.stop()
    console.print("stopped")
    return 0


def print_summary(cluster: LocalCluster, key: str) -> None:
    assert cluster.scheduler is not None
    console.print("[bold]Cutout local cluster is up[/bold]")
    if cluster.envoy is not None:
        console.print(f"  envoy      {cluster.envoy.address}   (public API: gRPC and gRPC-Web)")
        for gateway in cluster.gateways:
            console.print(f"  {gateway.name:<10} {gateway.address}   (behind envoy)")
    else:
        console.print(f"  gateway    {cluster.gateway_address}   (public API)")
    console.print(f"  scheduler  {cluster.scheduler.address}")
    for node in cluster.nodes:
        console.print(f"  {node.name:<10} {node.address}   models: {', '.join(cluster.models)}")
    if cluster.envoy is not None:
        console.print(f"  metrics    {cluster.envoy.admin_url}/stats/prometheus   (envoy)")
    for svc in [*cluster.gateways, cluster.scheduler, *cluster.nodes]:
        console.print(f"  metrics    {svc.metrics_url}   ({svc.name})")
    redis_note = f"embedded, AOF {cluster.config.appendfsync}" if cluster.redis else "external"
    console.print(f"  redis      {cluster.redis_url}   ({redis_note})")
    console.print(f"  results    {cluster.workdir / 'results'}")
    console.print(f"  logs       {cluster.workdir / 'logs'}   (restarts: supervisor.log)")
    console.print(f"  API key    {key}")
    console.print(f"\n  export CUTOUT_ADDR={cluster.public_address} CUTOUT_API_KEY={key}")
    console.print("  cutout submit photo.jpg --wait\n\nCtrl-C stops everything.")
