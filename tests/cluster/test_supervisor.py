"""The local cluster restarts a crashed service on its address: real processes, SIGKILL."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cutout import AsyncClient
from cutout.v1 import jobs_pb2
from services.common.config import PROJECT_ROOT
from services.local.cluster import ClusterConfig, LocalCluster, Service
from services.local.supervisor import Backoff
from tests.support.cluster import KEYS, final_state

A = KEYS["vendor-a"]


def supervised(tmp_path: Path, model_dir: Path, nodes: int, backoff: Backoff) -> LocalCluster:
    return LocalCluster(
        ClusterConfig(
            nodes=nodes,
            gateway_port=0,
            workdir=tmp_path / "cluster",
            model_dir=model_dir,
            api_keys=dict(KEYS),
            # Short leases so the dead scheduler's work comes back within seconds.
            extra_env={"CUTOUT_NODE_POLL_S": "0.2", "CUTOUT_LEASE_MS": "3000"},
            supervise=True,
            backoff=backoff,
        )
    )


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout_s}s")
        time.sleep(0.1)


def back_up(svc: Service, old_pid: int) -> bool:
    """A new process of `svc` is running and serving (its ready file written again)."""
    return svc.pid() != old_pid and svc.exit_code() is None and ready(svc)


def ready(svc: Service) -> bool:
    return svc.ready_file is not None and svc.ready_file.is_file()


async def test_killed_scheduler_and_node_come_back_on_their_addresses(
    tmp_path: Path, tiny_model_dir: Path, photos: dict[str, bytes]
) -> None:
    cluster = supervised(tmp_path, tiny_model_dir, 1, Backoff(initial_s=0.2, stable_s=60))
    cluster.start()
    try:
        assert cluster.scheduler is not None and cluster.supervisor is not None
        scheduler, node = cluster.scheduler, cluster.nodes[0]
        addresses = (scheduler.address, node.address)
        pids = (scheduler.pid(), node.pid())
        async with AsyncClient(cluster.gateway_address, A) as client:
            # The node dies first, so the job submitted next cannot have run yet when the
            # scheduler that accepted it dies too.
            cluster.kill(node)
            before = await client.submit(photos["coffee_small"])
            cluster.kill(scheduler)

            def both_back() -> bool:
                assert pids[0] is not None and pids[1] is not None
                return back_up(scheduler, pids[0]) and back_up(node, pids[1])

            await asyncio.to_thread(wait_for, both_back, 120, "restarted")
            assert (scheduler.address, node.address) == addresses

            done = await final_state(client, before.name)
            assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error.message
            after = await client.submit(photos["coffee_small"])
            done = await final_state(client, after.name)
            assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error.message
            assert done.node == node.address

        assert cluster.supervisor.restarts("scheduler") == 1
        assert cluster.supervisor.restarts("node-1") == 1
        log = (cluster.workdir / "logs" / "supervisor.log").read_text()
        assert f"scheduler ({addresses[0]}) killed by SIGKILL" in log
        assert f"node-1 ({addresses[1]}) killed by SIGKILL" in log
        assert f"scheduler restarted on {addresses[0]}" in log
        assert f"node-1 restarted on {addresses[1]}" in log
    finally:
        cluster.stop()
    # Stopping is no crash: every process stays stopped, nothing was restarted.
    services = [cluster.scheduler, *cluster.nodes, *cluster.gateways]
    assert all(s is not None and s.exit_code() is not None for s in services)
    log = (cluster.workdir / "logs" / "supervisor.log").read_text()
    assert log.count("restarted on") == 2
    assert log.rstrip().endswith("stopped supervising")


async def test_a_service_that_keeps_dying_backs_off_and_is_reported(
    tmp_path: Path, tiny_model_dir: Path, photos: dict[str, bytes]
) -> None:
    backoff = Backoff(initial_s=0.2, max_s=1.6, stable_s=60, alarm_after=4)
    cluster = supervised(tmp_path, tiny_model_dir, 2, backoff)
    cluster.start()
    try:
        assert cluster.supervisor is not None
        broken = cluster.nodes[1]
        broken.env["CUTOUT_NODE_CAPACITY"] = "lots"  # refused at start, every time
        cluster.kill(broken)
        log_path = cluster.workdir / "logs" / "supervisor.log"

        def restarting_delays() -> list[float]:
            return [
                float(d)
                for d in re.findall(r"node-2 \S+ .*restarting in ([\d.]+)s", log_path.read_text())
            ]

        await asyncio.to_thread(
            wait_for, lambda: len(restarting_delays()) >= 6, 120, "six exits of node-2"
        )
        # Doubling from 0.2 s up to the 1.6 s cap: no tight loop of restarts.
        assert restarting_delays()[:6] == [0.2, 0.4, 0.8, 1.6, 1.6, 1.6]
        assert cluster.supervisor.failing() == ["node-2"]
        log = log_path.read_text()
        assert log.count("node-2 KEEPS DYING: 4 exits in a row") == 1  # said once, loudly
        assert "KEEPS DYING: 5" not in log
        assert "CUTOUT_NODE_CAPACITY='lots' is not an integer" in log  # the end of its log
        assert "exit code 1" in log

        # The rest of the cluster still serves.
        async with AsyncClient(cluster.gateway_address, A) as client:
            job = await client.submit(photos["coffee_small"])
            done = await final_state(client, job.name)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error.message
        assert done.node == cluster.nodes[0].address
    finally:
        cluster.stop()
    assert all(n.exit_code() is not None for n in cluster.nodes)


def children(pid: int, module: str) -> list[int]:
    """Pids of the processes `pid` started that run `python -m <module>`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        if parent == pid and module.encode() in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


async def test_cutout_admin_up_restarts_a_killed_node_and_its_stop_restarts_nothing(
    tmp_path: Path, tiny_model_dir: Path, photos: dict[str, bytes]
) -> None:
    args = ["--workdir", str(tmp_path), "--port", "0", "--nodes", "1", "--no-envoy"]
    env = {
        **os.environ,
        "CUTOUT_MODEL_DIR": str(tiny_model_dir),
        "CUTOUT_NODE_POLL_S": "0.2",
        "PYTHONPATH": os.pathsep.join(
            [str(PROJECT_ROOT), str(PROJECT_ROOT / "clients" / "python")]
        ),
    }
    up = subprocess.Popen(
        [sys.executable, "-m", "services.admin", "up", *args],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    async def read_until(text: str, timeout_s: float = 180) -> str:
        assert up.stdout is not None
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in lines):
            assert time.monotonic() < deadline and up.poll() is None, "".join(lines)
            lines.append(await asyncio.to_thread(up.stdout.readline))
        return "".join(lines)

    try:
        printed = await read_until("Ctrl-C stops everything")
        node_address = re.search(r"^\s+node-1\s+(\S+)", printed, re.M)
        addr = re.search(r"CUTOUT_ADDR=(\S+)", printed)
        key = re.search(r"CUTOUT_API_KEY=(\S+)", printed)
        assert node_address and addr and key, printed
        [node_pid] = children(up.pid, "services.inference")
        os.kill(node_pid, signal.SIGKILL)
        printed = await read_until(f"supervisor: node-1 restarted on {node_address.group(1)}")
        assert f"node-1 ({node_address.group(1)}) killed by SIGKILL" in printed
        assert children(up.pid, "services.inference") != [node_pid]
        async with AsyncClient(addr.group(1), key.group(1)) as client:
            job = await client.submit(photos["coffee_small"])
            done = await final_state(client, job.name)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error.message
    finally:
        services = [
            pid
            for module in ("services.scheduler", "services.inference", "services.gateway")
            for pid in children(up.pid, module)
        ]
        up.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.to_thread(up.communicate, timeout=120)
    assert up.returncode == 0, "".join(lines) + rest
    assert len(services) == 3
    assert "stopped" in rest and "restart" not in rest, rest
    assert not any(alive(pid) for pid in services), "a service outlived cutout-admin up"
    log = (tmp_path / "logs" / "supervisor.log").read_text()
    assert log.count("restarted on") == 1
    assert log.rstrip().endswith("stopped supervising")
