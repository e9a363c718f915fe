"""The internal APIs are generated into the services only, under their protos' wire names. Lint,
breaking changes and stale generated code (buf, npm): tests/cluster/test_protos.py."""

from __future__ import annotations

from pathlib import Path

from services.common.config import PROJECT_ROOT


def test_internal_apis_are_generated_into_the_services_only() -> None:
    public = {p.name for p in (PROJECT_ROOT / "clients/python/cutout/v1").glob("*_pb2*.py")}
    internal = {p.name for p in (PROJECT_ROOT / "services/internal/v1").glob("*_pb2*.py")}
    assert public == {
        f"{n}_pb2{g}.py" for n in ("cutout_service", "jobs", "webhooks") for g in ("", "_grpc")
    }
    assert "scheduler_service_pb2.py" in internal and "inference_service_pb2.py" in internal
    from services.internal.v1 import inference_service_pb2_grpc

    # The wire names stay the proto's, whatever the Python module is called.
    source = Path(inference_service_pb2_grpc.__file__).read_text()
    assert "'/cutout.internal.v1.InferenceService/Work'" in source
    assert "/Process'" not in source  # Work is the node's one job API (issue 27)
