"""A local cluster made but never started leaves nothing in the system's temporary directory.
Clusters that ran or failed to start: tests/cluster/test_local_cluster.py."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from services.local.cluster import ClusterConfig, LocalCluster


def ready_folders(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("cutout-ready-*"))


def test_a_cluster_made_but_never_started_leaves_nothing(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cutout-admin up` makes its cluster before it migrates MySQL, which may fail."""
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    cluster = LocalCluster(ClusterConfig(workdir=tmp_path / "var", model_dir=tiny_model_dir))
    cluster.stop()
    assert ready_folders(private_tmp) == []
