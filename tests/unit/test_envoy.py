"""The shipped Envoy config (deploy/envoy/envoy.yaml) as a file: retries only for methods free of
side effects, the Kubernetes gateway Service behind it, the gateway's request limit. On a
real Envoy: tests/cluster/test_envoy.py."""

from __future__ import annotations

import re
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import descriptor_pb2

from cutout.v1 import cutout_service_pb2 as pb
from services.common.serving import MiB
from services.local.envoy import CANONICAL
from tests.support.settings import default_gateway_settings

SERVICE = "cutout.v1.CutoutService"


def method_regex_routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    return list(vhost["routes"])


def route_for(routes: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """The first route matching `path`, as Envoy picks it (safe_regex is a full match)."""
    for route in routes:
        match = route["match"]
        if "safe_regex" in match and re.fullmatch(match["safe_regex"]["regex"], path):
            return route
        if "prefix" in match and path.startswith(match["prefix"]):
            return route
    raise AssertionError(f"no route for {path}")


def test_envoy_retries_exactly_the_methods_the_api_marks_free_of_side_effects() -> None:
    """A method added to the API is either retried (a read) or never (anything else)."""
    config = yaml.safe_load(CANONICAL.read_text())
    routes = method_regex_routes(config)
    service = pb.DESCRIPTOR.services_by_name["CutoutService"]
    safe = descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
    for method in service.methods:
        route = route_for(routes, f"/{SERVICE}/{method.name}")["route"]
        reads = method.GetOptions().idempotency_level == safe
        assert ("retry_policy" in route) == reads, method.name
        if reads:
            assert set(route["retry_policy"]["retry_on"].split(",")) == {
                "unavailable",
                "reset",
                "connect-failure",
                "refused-stream",
            }
        # No route timeout at all (Envoy's default of 15 s would cut watches).
        assert route["timeout"] == "0s", method.name


def test_the_canonical_config_fronts_the_kubernetes_gateway_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the Kubernetes manifests rely on, and the gateway's own request limit."""
    config = yaml.safe_load(CANONICAL.read_text())
    (cluster,) = config["static_resources"]["clusters"]
    assert (cluster["type"], cluster["lb_policy"]) == ("STRICT_DNS", "LEAST_REQUEST")
    (hosts,) = cluster["load_assignment"]["endpoints"]
    (endpoint,) = hosts["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert address == {"address": "gateway.cutout.svc.cluster.local", "port_value": 50051}
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == SERVICE
    assert config["admin"]["address"]["socket_address"]["port_value"] == 9901
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 8080
    filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    (buffer,) = [f for f in filters if f["name"] == "envoy.filters.http.buffer"]
    gateway = default_gateway_settings(monkeypatch)
    assert buffer["typed_config"]["max_request_bytes"] == gateway.max_message_bytes + 5  # + frame
    # The refusal says what fits, in the same numbers.
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (mapper,) = hcm["local_reply_config"]["mappers"]
    headers = {h["header"]["key"]: h["header"]["value"] for h in mapper["headers_to_add"]}
    assert headers["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    message = headers["grpc-message"]
    assert f"larger than the {gateway.max_message_bytes // MiB} MiB limit" in message
    assert f"up to {gateway.max_image_bytes // MiB} MiB" in message
