"""Helpers for the tests that run a cluster (tests/cluster); the fixture that makes one per
test, make_cluster, is in tests/cluster/conftest.py.

- KEYS: three vendors' API keys, which every test cluster accepts (bench/ uses them too).
- start_cluster(): one node and a gateway on free ports, for module-scoped fixtures.
- add_vendor(): register a vendor with `cutout-admin vendors`, as an operator does.
- final_state(): follow a job to its end, through a scheduler restart.
- admin_up(): `cutout-admin up` as a user runs it, until it prints a given line; stopped
  with SIGTERM on the way out, its exit code and the rest of its output kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from cutout import AsyncClient, CutoutError
from cutout.v1 import jobs_pb2
from services.common.config import PROJECT_ROOT
from services.gateway.auth import new_key
from services.local.cluster import ClusterConfig, LocalCluster

KEYS = {"vendor-a": new_key(), "vendor-b": new_key(), "vendor-c": new_key()}


def start_cluster(
    workdir: Path,
    model_dir: Path,
    start_nodes: bool = True,
    gateways: int = 1,
    envoy: bool = False,
    **extra_env: str,
) -> LocalCluster:
    """One node and a gateway on free ports, for module-scoped fixtures (stop it yourself)."""
    cluster = LocalCluster(
        ClusterConfig(
            nodes=1,
            gateway_port=0,
            gateways=gateways,
            envoy=envoy,
            workdir=workdir,
            model_dir=model_dir,
            api_keys=dict(KEYS),
            extra_env={"CUTOUT_NODE_POLL_S": "0.2", **extra_env},
        )
    )
    cluster.start(start_nodes=start_nodes)
    return cluster


def add_vendor(redis_url: str, vendor: str, limits: str) -> str:
    """Register a vendor the way an operator does; returns its key."""
    admin = [sys.executable, "-m", "services.admin", "vendors", "--redis", redis_url]
    done = subprocess.run(
        [*admin, "add", vendor, "--limits", limits],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


async def final_state(client: AsyncClient, name: str, timeout_s: float = 120) -> jobs_pb2.Job:
    """Follow the job to its end, re-watching through a scheduler restart."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s

    async def follow() -> jobs_pb2.Job:
        job = jobs_pb2.Job()
        async for event in client.watch(name):
            job = event.job
        return job

    while (left := deadline - loop.time()) > 0:
        try:
            job = await asyncio.wait_for(follow(), left)
            if job.done:
                return job
        except CutoutError:
            pass  # the scheduler is restarting
        except TimeoutError:
            break
        await asyncio.sleep(0.5)
    raise AssertionError(f"{name} did not finish in {timeout_s}s: {(await client.get(name)).state}")


@dataclass
class AdminUp:
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)  # printed until the awaited line
    rest: str = ""  # printed from then until it exited

    @property
    def printed(self) -> str:
        return "".join(self.lines)


@contextlib.asynccontextmanager
async def admin_up(args: list[str], until: str, **env: str) -> AsyncIterator[AdminUp]:
    """Run `cutout-admin up ARGS` (with env added) until a printed line contains `until`
    (at most 180 s); on the way out, SIGTERM and wait for it to exit."""
    path = os.pathsep.join([str(PROJECT_ROOT), str(PROJECT_ROOT / "clients" / "python")])
    process = subprocess.Popen(
        [sys.executable, "-m", "services.admin", "up", *args],
        env={**os.environ, "PYTHONPATH": path, **env},
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run = AdminUp(process)
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 180
        while not any(until in line for line in run.lines):
            assert time.monotonic() < deadline and process.poll() is None, run.printed
            run.lines.append(await asyncio.to_thread(process.stdout.readline))
        yield run
    finally:
        process.send_signal(signal.SIGTERM)
        run.rest, _ = await asyncio.to_thread(process.communicate, timeout=120)
