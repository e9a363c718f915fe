"""A local cluster leaves nothing in the system's temporary directory: the folder of ready
files (`cutout-ready-*`) goes when the cluster stops, whether it ran or failed to start.

Each test gives the cluster a private temporary directory, so runs beside it do not count.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from services.local.cluster import ClusterConfig, LocalCluster
from tests.support.cluster import KEYS, admin_up


def ready_folders(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("cutout-ready-*"))


async def test_cutout_admin_up_leaves_no_ready_folder_behind(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    args = ["--workdir", str(tmp_path / "var"), "--port", "0", "--nodes", "1", "--no-envoy"]
    env = {"TMPDIR": str(private_tmp), "CUTOUT_MODEL_DIR": str(tiny_model_dir)}
    async with admin_up(args, "Ctrl-C stops everything", **env) as run:
        # The test sees the folder the cluster uses, so its absence later means something.
        assert len(ready_folders(private_tmp)) == 1, list(private_tmp.iterdir())
    assert run.process.returncode == 0, run.printed + run.rest
    assert ready_folders(private_tmp) == [], "cutout-admin up left its ready folder behind"


def test_a_cluster_that_fails_to_start_removes_its_ready_folder(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    cluster = LocalCluster(
        ClusterConfig(
            nodes=1,
            gateway_port=0,
            workdir=tmp_path / "var",
            model_dir=tiny_model_dir,
            api_keys=dict(KEYS),
            # The node stops at start on a bad setting, after the scheduler is up.
            extra_env={"CUTOUT_RUNTIME": "no-such-runtime"},
        )
    )
    try:
        with pytest.raises(RuntimeError, match="node-1 exited"):
            cluster.start()
        assert cluster.scheduler is not None and cluster.scheduler.exit_code() is not None
    finally:
        cluster.stop()
    assert ready_folders(private_tmp) == [], "a failed start left its ready folder behind"
