"""Every service's /metrics after a known workload, and the alert rules and dashboard
that name those metrics.

Real gateway, scheduler and node processes on a real redis-server; the
tiny test model. The checks are exact counts of what the workload did.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cutout import AsyncClient, CutoutError
from cutout.client import build_submission
from cutout.v1 import jobs_pb2
from services.common.config import PROJECT_ROOT
from services.local.cluster import LocalCluster, Service
from tests.support.cluster import KEYS
from tests.support.waiting import until

MONITORING = PROJECT_ROOT / "deploy" / "monitoring"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(svc: Service) -> tuple[Samples, set[str]]:
    """(samples by name and labels, every exported metric name incl. families without samples)."""
    with urllib.request.urlopen(svc.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    samples: Samples = {}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_count", "_sum"))
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, names


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of name whose labels include the given ones."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def scrape_when(svc: Service, ready: Callable[[Samples], bool], what: str) -> Samples:
    """svc's samples once `ready` holds for them: gauges are refreshed on an interval."""

    async def scraped() -> Samples | None:
        samples, _ = await asyncio.to_thread(scrape, svc)
        return samples if ready(samples) else None

    return await until(scraped, what, every_s=0.1)


async def wait_done(client: AsyncClient, names: list[str]) -> None:
    deadline = time.monotonic() + 60
    while not all([(await client.get(n)).done for n in names]):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)


@pytest.fixture
def cluster(make_cluster, tiny_model_dir: Path) -> LocalCluster:  # type: ignore[no-untyped-def]
    c: LocalCluster = make_cluster(
        tiny_model_dir,
        start=False,
        rate_limits="requests=1000/900,remove_background=1000/3600,batches=1/3600",
        CUTOUT_METRICS_INTERVAL_S="0.1",
    )
    c.start(start_nodes=False)
    return c


async def test_each_service_counts_a_known_workload(
    cluster: LocalCluster, photos: dict[str, bytes]
) -> None:
    image = photos["coffee_small"]
    async with AsyncClient(cluster.gateway_address, KEYS["vendor-a"]) as client:
        # 4 jobs at priority 0, 2 at priority 5, one invalid submit, one batch of
        # 3 items (one not an image), then a second batch the quota refuses.
        names = [(await client.submit(image)).name for _ in range(4)]
        names += [(await client.submit(image, priority=5)).name for _ in range(2)]
        with pytest.raises(CutoutError):
            await client.submit(b"not an image at all")
        items = [build_submission(image), build_submission(b"GIF89a..."), build_submission(image)]
        batch = await client.submit_batch(items)
        names += [o.job.name for o in batch.outcomes if o.HasField("job")]
        with pytest.raises(CutoutError) as refused:
            await client.submit_batch([build_submission(image)])
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED

        queued = await scrape_when(
            cluster.scheduler,  # type: ignore[arg-type]
            lambda s: value(s, "cutout_jobs", state="queued") == 8,
            "a gauge refresh that sees the 8 queued jobs",
        )
        assert value(queued, "cutout_queue_depth", vendor="vendor-a", priority="0") == 6
        assert value(queued, "cutout_queue_depth", vendor="vendor-a", priority="5") == 2
        assert value(queued, "cutout_jobs", state="queued") == 8
        assert value(queued, "cutout_healthy_nodes") == 0

        cluster.start_node(0)
        await wait_done(client, names)
        states = [(await client.get(n)).state for n in names]
        assert states == [jobs_pb2.JOB_STATE_SUCCEEDED] * 8
        await scrape_when(
            cluster.scheduler,  # type: ignore[arg-type]
            lambda s: (
                value(s, "cutout_queue_depth") == 0
                and value(s, "cutout_jobs", state="queued") == 0
                and value(s, "cutout_jobs", state="running") == 0
            ),
            "a gauge refresh after the 8 jobs ran",
        )

    gw, _ = scrape(cluster.gateway)  # type: ignore[arg-type]
    rpc = "cutout_rpc_requests_total"
    assert value(gw, rpc, method="SubmitJob", code="OK") == 6
    assert value(gw, rpc, method="SubmitJob", code="INVALID_ARGUMENT") == 1
    assert value(gw, rpc, method="SubmitBatch", code="OK") == 1
    assert value(gw, rpc, method="SubmitBatch", code="RESOURCE_EXHAUSTED") == 1
    assert value(gw, "cutout_rate_limit_refusals_total", quota="batches") == 1
    assert value(gw, "cutout_batch_size_count") == 1
    assert value(gw, "cutout_batch_items_total", outcome="accepted") == 2
    assert value(gw, "cutout_batch_items_total", outcome="rejected") == 1

    sched, _ = scrape(cluster.scheduler)  # type: ignore[arg-type]
    assert value(sched, "cutout_jobs_enqueued_total", outcome="queued") == 8
    # The gateway sends enqueues together (EnqueueJobs): at most one call per job.
    assert 1 <= value(sched, rpc, method="EnqueueJobs", code="OK") <= 8
    assert value(sched, "cutout_jobs_finished_total", outcome="succeeded") == 8
    assert value(sched, "cutout_jobs_finished_total", outcome="failed") == 0
    assert value(sched, "cutout_attempts_total") == 8
    for histogram in (
        "cutout_queue_wait_seconds",
        "cutout_end_to_end_seconds",
        "cutout_run_seconds",
    ):
        assert value(sched, histogram + "_count") == 8
    assert value(sched, "cutout_queue_depth") == 0
    assert value(sched, "cutout_jobs", state="running") == 0
    assert value(sched, "cutout_healthy_nodes") == 1
    node = cluster.nodes[0].address
    assert value(sched, "cutout_node_capacity", node=node) >= 1
    assert value(sched, "cutout_node_in_flight", node=node) == 0

    nd, _ = scrape(cluster.nodes[0])
    ok = {"operation": "remove_background", "outcome": "succeeded"}
    assert value(nd, "cutout_node_jobs_total", **ok) == 8
    assert value(nd, "cutout_node_process_seconds_count", operation="remove_background") == 8
    assert (
        value(nd, "cutout_model_execution_provider", model="tiny", provider="CPUExecutionProvider")
        == 1
    )
    assert value(nd, "cutout_model_provider_fallback", model="tiny") == 0
    assert value(nd, "cutout_node_jobs_in_flight") == 0

    # Labels stay bounded: no job id anywhere in any exposition.
    for svc in (cluster.gateway, cluster.scheduler, cluster.nodes[0]):
        with urllib.request.urlopen(svc.metrics_url, timeout=10) as reply:  # type: ignore[union-attr]
            text = reply.read().decode()
        assert not any(n.removeprefix("jobs/") in text for n in names)


async def test_logs_are_json_with_job_vendor_and_node_and_no_secrets(
    cluster: LocalCluster, photos: dict[str, bytes]
) -> None:
    cluster.start_node(0)
    async with AsyncClient(cluster.gateway_address, KEYS["vendor-a"]) as client:
        names = [(await client.submit(photos["coffee_small"])).name for _ in range(3)]
        await wait_done(client, names)
    services = (cluster.gateway, cluster.scheduler, cluster.nodes[0])

    def lines_about_jobs() -> int:
        logs = [svc.log_path.read_text() for svc in services]  # type: ignore[union-attr]
        return sum('"job_id"' in line for text in logs for line in text.splitlines())

    # Each service writes its log as it goes: wait for the lines about the three jobs.
    await until(lambda: lines_about_jobs() >= 3 * 4, "the services logged the three jobs")
    about_jobs = 0
    for svc in services:
        text = svc.log_path.read_text()  # type: ignore[union-attr]
        for key in KEYS.values():
            assert key not in text
        for line in text.splitlines():
            entry = json.loads(line)  # every line is one JSON object
            assert {"ts", "level", "service", "msg"} <= set(entry)
            if "job_id" in entry:
                about_jobs += 1
                assert entry["vendor"] == "vendor-a", entry
                if svc is not cluster.gateway:
                    assert entry.get("node"), entry
    assert about_jobs >= 3 * 4  # accepted, attempt started, processing, processed, succeeded


def referenced_metrics() -> dict[str, set[str]]:
    """Every cutout_* metric the alert rules and the dashboard name, by file."""
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs_dash = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    find = re.compile(r"\bcutout_[a-z0-9_]+")
    return {
        "alerts.yaml": {m for e in exprs for m in find.findall(e)},
        "grafana-dashboard.json": {m for e in exprs_dash for m in find.findall(e)},
    }


async def test_every_metric_in_alerts_and_dashboard_is_exported(
    cluster: LocalCluster,
) -> None:
    cluster.start_node(0)
    exported: set[str] = set()
    for svc in (cluster.gateway, cluster.scheduler, cluster.nodes[0]):
        exported |= scrape(svc)[1]  # type: ignore[arg-type]
    for source, names in referenced_metrics().items():
        assert names, source
        missing = sorted(names - exported)
        assert not missing, f"{source} names metrics no service exports: {missing}"
