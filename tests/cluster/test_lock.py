"""The client (which keeps ranges, as a library must) works with the newest releases those
ranges allow, and says what to install without its [cli] extra: new venvs made with uv."""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.config import PROJECT_ROOT
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS, start_cluster
from tests.support.images import jpeg
from tests.support.lockfile import installed


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> LocalCluster:
    cluster = start_cluster(tmp_path_factory.mktemp("lock"), tiny_model_dir, start_nodes=False)
    yield cluster  # type: ignore[misc]
    cluster.stop()


def _uv(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    uv = Path(sys.executable).with_name("uv")
    run = subprocess.run([str(uv), *args], capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"uv {' '.join(args)}:\n{run.stdout}{run.stderr}"
    return run


def test_the_client_works_with_the_newest_releases_its_ranges_allow(
    tmp_path: Path, idle: LocalCluster
) -> None:
    """A user's `pip install cutout-client[cli]` resolves today's releases, not our lock: install
    it so (from the package index, newest first, nothing from the lock), then submit a job and
    read it back with that install's CLI against a real gateway."""
    venv = tmp_path / "venv"
    _uv("venv", "-q", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    client = PROJECT_ROOT / "clients" / "python"
    _uv("pip", "install", "-q", "--python", str(python), "--refresh", "--resolution", "highest",
        f"{client}[cli]")  # fmt: skip
    newest = installed(md.distributions(path=[str(p) for p in venv.glob("lib/*/site-packages")]))
    assert {"grpcio", "protobuf", "rich"} <= set(newest)
    assert not {"rembg", "onnxruntime", "redis", "numpy"} & set(newest), sorted(newest)

    import numpy as np

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg(np.full((32, 32, 3), 128, np.uint8)))
    env = {**os.environ, "CUTOUT_API_KEY": KEYS["vendor-a"], "CUTOUT_ADDR": idle.gateway_address}
    cli = venv / "bin" / "cutout"
    submit = subprocess.run([str(cli), "submit", str(photo)], env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr
    (name,) = [w for w in submit.stdout.split() if w.startswith("jobs/")]
    status = subprocess.run([str(cli), "status", name], env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert status.returncode == 0 and "queued" in status.stdout, status.stdout + status.stderr


def test_the_client_without_its_cli_extra_says_what_to_install(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _uv("venv", "-q", "--python", sys.executable, str(venv))
    _uv("pip", "install", "-q", "--python", str(venv / "bin" / "python"),
        str(PROJECT_ROOT / "clients" / "python"))  # fmt: skip
    library = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import cutout; from cutout import Client; print(Client.__name__)"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert library.returncode == 0 and "Client" in library.stdout, library.stderr
    cli = subprocess.run([str(venv / "bin" / "cutout"), "--help"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert cli.returncode == 1
    assert "pip install 'cutout-client[cli]'" in cli.stderr
