"""The client is a client: installable alone, shipping only the public API, importing no service
(run in subprocesses, built with pip, resolved against the package index)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from services.common.config import PROJECT_ROOT

SERVER_ONLY = (
    "onnxruntime",
    "rembg",
    "redis",
    "PIL",
    "numpy",
    "grpc_health",
    "grpc_reflection",
    "services",
)

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


def test_client_wheel_holds_the_public_api_and_nothing_of_the_services(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(PROJECT_ROOT / "clients" / "python")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = tmp_path.glob("cutout_client-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        sources = {n: zf.read(n).decode() for n in names if n.endswith((".py", ".pyi"))}
    assert all(n.startswith(("cutout/", "cutout_client-")) for n in names), names
    generated = sorted(n for n in names if "_pb2" in n and n.endswith(".py"))
    assert generated == [
        "cutout/v1/cutout_service_pb2.py",
        "cutout/v1/cutout_service_pb2_grpc.py",
        "cutout/v1/jobs_pb2.py",
        "cutout/v1/jobs_pb2_grpc.py",
        "cutout/v1/webhooks_pb2.py",
        "cutout/v1/webhooks_pb2_grpc.py",
    ]
    assert "cutout/v1/jobs_pb2.pyi" in names and "cutout/py.typed" in names
    for name, text in sources.items():
        assert "import services" not in text and "from services" not in text, name
        assert "cutout.internal" not in text, name


def _resolve(extra: str, report: Path) -> set[str]:
    """What `pip install ./clients/python '.[extra]'` would install on a fresh machine."""
    run = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--report", str(report), str(PROJECT_ROOT / "clients" / "python"),
         f"{PROJECT_ROOT}[{extra}]"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    import json

    return {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}


def test_the_cpu_and_gpu_installs_each_resolve_to_one_runtime(tmp_path: Path) -> None:
    """Resolved by pip against the package index, as a user's install would be: the two
    ONNX Runtime distributions share their files, so a set holding both is broken."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        cpu, gpu = pool.map(lambda e: _resolve(e, tmp_path / f"{e}.json"), ["cpu", "gpu"])
    for wanted, got in (("onnxruntime", cpu), ("onnxruntime-gpu", gpu)):
        assert {"cutout-client", "cutout-server", "rembg"} <= got
        assert {n for n in got if n.startswith("onnxruntime")} == {wanted}, sorted(got)
