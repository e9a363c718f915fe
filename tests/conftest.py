"""Fixtures that start real things and clean them up.

- redis_server(): a private redis-server on a free port, with AOF, killable.
- tiny_model_dir: a folder with a tiny ONNX model the tests build (fast pipeline tests).
- real_model_dir: the real IS-Net model (CUTOUT_MODEL_DIR, default ../shared/models).
- cluster(...): redis + scheduler + nodes + gateway as real processes; with envoy=True,
  Envoy (deploy/envoy/envoy.yaml) in front of `gateways` gateway replicas.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.common.config import default_model_dir
from services.gateway.auth import new_key
from services.gateway.ratelimit import GENEROUS
from services.local.cluster import ClusterConfig, LocalCluster
from services.local.redis import RedisServer
from tests.tinymodel import build_tiny_model

KEYS = {"vendor-a": new_key(), "vendor-b": new_key(), "vendor-c": new_key()}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    started: list[RedisServer] = []

    def make(appendfsync: str = "everysec") -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(started)}", appendfsync=appendfsync)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    build_tiny_model(folder / "tiny.onnx")
    return folder


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    folder = default_model_dir()
    model = folder / "isnet-general-use.onnx"
    if not model.is_file():
        # Fail, never skip: a suite that silently drops the real model proves nothing.
        pytest.fail(f"real model missing: {model} (set CUTOUT_MODEL_DIR)")
    return folder


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


def jpeg(array: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """Real photos that ship with scikit-image, as JPEG bytes."""
    import skimage.data

    return {
        "astronaut": jpeg(skimage.data.astronaut()),
        "chelsea": jpeg(skimage.data.chelsea()),
        "coffee": jpeg(skimage.data.coffee()),
        # 150x100: for runs of hundreds of jobs where the pixels do not matter.
        "coffee_small": jpeg(skimage.data.coffee()[::4, ::4]),
    }


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    # gRPC honours http_proxy; loopback tests must never go through one.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "grpc_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("CUTOUT_API_KEY", raising=False)
