"""A node started with CUTOUT_REQUIRE_GPU stops, naming the setting: on the CPU when the switch
is on, and at once when its value is not a boolean.

The parser itself: tests/unit/test_boolean_settings.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.config import PROJECT_ROOT
from services.common.internal_auth import new_token


def run_node(tmp_path: Path, model_dir: Path, timeout_s: float = 90, **env: str) -> tuple[int, str]:
    """Run `python -m services.inference` until it exits: (exit code, stderr).

    A node that starts serving instead (its ready file appears) fails the test.
    """
    ready = tmp_path / "node.port"
    stderr_path = tmp_path / "node.stderr"
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(PROJECT_ROOT), str(PROJECT_ROOT / "clients" / "python")]
        ),
        "CUTOUT_INTERNAL_TOKEN": new_token(),
        "CUTOUT_MODEL_DIR": str(model_dir),
        "CUTOUT_NODE_LISTEN": "127.0.0.1:0",
        "CUTOUT_METRICS_LISTEN": "",
        "CUTOUT_READY_FILE": str(ready),
        **env,
    }
    with stderr_path.open("wb") as stderr:
        node = subprocess.Popen(
            [sys.executable, "-m", "services.inference"],
            env=full_env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while node.poll() is None:
            assert not ready.exists(), f"the node started serving with {env}"
            assert time.monotonic() < deadline, (
                f"the node neither served nor stopped in {timeout_s}s"
            )
            time.sleep(0.05)
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    return node.returncode, stderr_path.read_text(errors="replace")


def test_require_gpu_true_stops_a_node_whose_models_run_on_the_cpu(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # CUTOUT_RUNTIME=onnxruntime runs on the CPU on any host, GPU or not.
    code, stderr = run_node(
        tmp_path, tiny_model_dir, CUTOUT_REQUIRE_GPU="true", CUTOUT_RUNTIME="onnxruntime"
    )
    assert code != 0
    last = stderr.strip().splitlines()[-1]
    assert "CUTOUT_REQUIRE_GPU" in last and "run on the CPU" in last, stderr[-3000:]


@pytest.mark.parametrize("raw", ["maybe", "enabled"])
def test_a_bad_require_gpu_stops_the_node_naming_the_setting(
    raw: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    code, stderr = run_node(tmp_path, tiny_model_dir, CUTOUT_REQUIRE_GPU=raw)
    assert code != 0
    last = stderr.strip().splitlines()[-1]
    assert f"CUTOUT_REQUIRE_GPU={raw!r}" in last and "SettingsError" in last, stderr[-3000:]
