"""The client is a client: its distribution and the server's extras never bring both ONNX
Runtimes. The client installed, built and run alone: tests/cluster/test_client_only.py."""

from __future__ import annotations

import tomllib

from services.common.config import PROJECT_ROOT


def test_extras_never_install_both_runtimes() -> None:
    client = tomllib.loads((PROJECT_ROOT / "clients/python/pyproject.toml").read_text())
    base = " ".join(client["project"]["dependencies"]).lower()
    for heavy in ("onnxruntime", "rembg", "redis", "pillow", "numpy"):
        assert heavy not in base
    server = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    assert not any("onnxruntime" in d for d in server["dependencies"])
    extras = server["optional-dependencies"]
    cpu = [d.split(">")[0] for d in extras["cpu"]]
    assert "onnxruntime" in cpu and "onnxruntime-gpu" not in cpu
    assert [d.split(">")[0] for d in extras["gpu"]] == ["onnxruntime-gpu"]
    (dev_server,) = [d for d in extras["dev"] if d.startswith("cutout-server[")]
    assert "cpu" in dev_server and "gpu" not in dev_server
