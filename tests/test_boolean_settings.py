"""Switches (CUTOUT_REQUIRE_GPU, CUTOUT_URL_ALLOW_HTTP) read 1/0, true/false, yes/no, on/off.

One parser (services/common/config.py env_bool) for every boolean setting; any
other value stops the service with a message naming the setting, never off.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.config import PROJECT_ROOT, SettingsError, env_bool
from services.common.internal_auth import new_token
from services.gateway.settings import GatewaySettings
from services.inference.settings import NodeSettings

ON = ["1", "true", "TRUE", "True", "yes", "YES", "Yes", "on", "ON", "On", " true "]
OFF = ["0", "false", "FALSE", "False", "no", "NO", "No", "off", "OFF", "Off", " off "]
BAD = ["maybe", "2", "-1", "tru", "y", "n", "enabled", "10", "1.0", "on off"]


@pytest.mark.parametrize("raw", ON)
def test_every_spelling_of_on_in_any_case(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUTOUT_TEST_SWITCH", raw)
    assert env_bool("CUTOUT_TEST_SWITCH", False) is True


@pytest.mark.parametrize("raw", OFF)
def test_every_spelling_of_off_in_any_case(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUTOUT_TEST_SWITCH", raw)
    assert env_bool("CUTOUT_TEST_SWITCH", True) is False


@pytest.mark.parametrize("default", [True, False])
def test_unset_or_empty_is_the_default(default: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUTOUT_TEST_SWITCH", raising=False)
    assert env_bool("CUTOUT_TEST_SWITCH", default) is default
    monkeypatch.setenv("CUTOUT_TEST_SWITCH", "")
    assert env_bool("CUTOUT_TEST_SWITCH", default) is default


@pytest.mark.parametrize("raw", BAD)
def test_any_other_value_is_an_error_naming_the_setting(
    raw: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUTOUT_TEST_SWITCH", raw)
    with pytest.raises(SettingsError) as caught:
        env_bool("CUTOUT_TEST_SWITCH", False)
    message = str(caught.value)
    assert "CUTOUT_TEST_SWITCH" in message and repr(raw) in message
    for word in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        assert word in message  # it says what would have been accepted


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUTOUT_INTERNAL_TOKEN", new_token())


@pytest.mark.usefixtures("token")
@pytest.mark.parametrize(("raw", "expected"), [("true", True), ("On", True), ("no", False)])
def test_the_services_read_their_switches_with_it(
    raw: str, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUTOUT_REQUIRE_GPU", raw)
    monkeypatch.setenv("CUTOUT_URL_ALLOW_HTTP", raw)
    assert NodeSettings.from_env().require_gpu is expected
    assert GatewaySettings.from_env().url_allow_http is expected


@pytest.mark.usefixtures("token")
def test_a_bad_switch_stops_the_gateway_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUTOUT_URL_ALLOW_HTTP", "sometimes")
    with pytest.raises(SettingsError, match="CUTOUT_URL_ALLOW_HTTP='sometimes'"):
        GatewaySettings.from_env()


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
