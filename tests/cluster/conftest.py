"""tests/cluster: real processes. Local clusters (redis-server, scheduler, nodes, gateways,
Envoy), gRPC servers, the CLIs as subprocesses, Node and Chromium, kubectl, buf, pip and uv,
the benchmarks' peers. Every port is a free one (port 0 or free_port()), so files run in
parallel (make test: pytest-xdist, one file per worker at a time).

- make_cluster(model_dir, ...): a LocalCluster per test, stopped after it.
- tests/support/cluster.py: KEYS, start_cluster() for module-scoped clusters, add_vendor,
  final_state.

Shared fixtures (tiny_model_dir, real_model_dir, photos, redis_server, standin) are in
tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.gateway.ratelimit import GENEROUS
from services.local.cluster import ClusterConfig, LocalCluster
from tests.support.cluster import KEYS


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    clusters: list[LocalCluster] = []

    def make(
        model_dir: Path,
        nodes: int = 1,
        start: bool = True,
        dns_nodes: bool = False,
        appendfsync: str = "everysec",
        rate_limits: str = GENEROUS,
        gateways: int = 1,
        envoy: bool = False,
        **extra_env: str,
    ) -> LocalCluster:
        config = ClusterConfig(
            gateways=gateways,
            envoy=envoy,
            rate_limits=rate_limits,
            dns_nodes=dns_nodes,
            appendfsync=appendfsync,
            nodes=nodes,
            gateway_port=0,
            workdir=tmp_path / f"cluster-{len(clusters)}",
            model_dir=model_dir,
            api_keys=dict(KEYS),
            extra_env={"CUTOUT_NODE_POLL_S": "0.2", "CUTOUT_LOG_LEVEL": "INFO", **extra_env},
        )
        cluster = LocalCluster(config)
        clusters.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop()
