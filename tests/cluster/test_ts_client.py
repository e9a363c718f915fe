"""The TypeScript client (clients/ts): typed with `tsc --strict`, linted, and its
Node tests (`npm test`, Node's own runner) passing against a live cluster.

The cluster runs the tiny model behind Envoy (two gateways); vendor-a and vendor-b
are static keys, and one more vendor per run is registered with `cutout-admin
vendors add --limits requests=1/N` so that it, and only it, meets its rate limit.
What each Node test proves is in clients/ts/test/client.test.ts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from services.common.config import PROJECT_ROOT
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS, add_vendor
from tests.support.npm import run_npm

TS = PROJECT_ROOT / "clients" / "ts"
LIMITED_PERIOD_S = 4


def npm(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    return run_npm(TS, *args, env=env, timeout=timeout)


def test_typescript_is_strict_and_typed() -> None:
    npm("run", "typecheck")


def test_typescript_is_lint_clean() -> None:
    npm("run", "lint")


def node_tests_env(cluster: LocalCluster, protocol: str, photo: Path) -> dict[str, str]:
    return {
        "CUTOUT_TEST_ADDR": cluster.public_address,
        "CUTOUT_TEST_PROTOCOL": protocol,
        "CUTOUT_TEST_KEY_A": KEYS["vendor-a"],
        "CUTOUT_TEST_KEY_B": KEYS["vendor-b"],
        # A vendor of its own per run: the quota is spent by the run that uses it.
        "CUTOUT_TEST_KEY_LIMITED": add_vendor(
            cluster.redis_url, f"limited-{protocol}", f"requests=1/{LIMITED_PERIOD_S}"
        ),
        "CUTOUT_TEST_LIMITED_PERIOD_S": str(LIMITED_PERIOD_S),
        "CUTOUT_TEST_PHOTO": str(photo),
    }


def test_node_client_through_envoy(
    make_cluster: Callable[..., LocalCluster],
    tiny_model_dir: Path,
    photos: dict[str, bytes],
    tmp_path: Path,
) -> None:
    """The Node tests through Envoy in front of two gateways, as gRPC (HTTP/2) and as
    gRPC-Web (what browsers speak; Envoy's grpc_web filter translates it)."""
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(photos["astronaut"])
    cluster = make_cluster(tiny_model_dir, envoy=True, gateways=2)
    for protocol in ("grpc", "grpc-web"):
        output = npm("test", env=node_tests_env(cluster, protocol, photo))
        print(output)
        assert "# fail 0" in output and f"over {protocol} at" in output, output
