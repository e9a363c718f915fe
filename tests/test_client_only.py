"""Installing the client alone must not need onnxruntime, rembg or Redis."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from services.common.config import PROJECT_ROOT

SERVER_ONLY = ("onnxruntime", "rembg", "redis", "PIL", "numpy", "grpc_health", "grpc_reflection")

# Run the client with every server-only package made unimportable.
BLOCKER = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_ONLY!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import cutout, cutout.cli, cutout.client
from cutout import Client, AsyncClient, CutoutError
sub = cutout.client.build_submission(b"\\xff\\xd8\\xff", background="00ff00")
assert sub.operation.remove_background.background_color.green == 255
try:
    cutout.cli.main(["--help"])
except SystemExit as e:
    assert e.code == 0
"""


def test_client_and_cli_import_without_server_packages() -> None:
    run = subprocess.run(
        [sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert "submit" in run.stdout


def test_base_dependencies_leave_server_parts_to_extras() -> None:
    meta = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(meta["dependencies"]).lower()
    for heavy in ("onnxruntime", "rembg", "redis", "pillow", "numpy"):
        assert heavy not in base
    assert any("rembg" in d for d in meta["optional-dependencies"]["server"])
    assert any("onnxruntime-gpu" in d for d in meta["optional-dependencies"]["gpu"])
