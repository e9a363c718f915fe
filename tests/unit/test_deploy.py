"""What the Kubernetes manifests rely on that needs no rendering: every setting a service reads
is documented, and numba reads the one library variable the manifests set. The manifests
themselves (rendered by kubectl): tests/cluster/test_deploy.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from services.common.config import PROJECT_ROOT
from tests.support.settings import known_variables


def test_numba_reads_numba_cache_dir() -> None:
    """The one library variable the manifests set is one its library reads."""
    spec = importlib.util.find_spec("numba")
    assert spec is not None and spec.origin is not None
    config = Path(spec.origin).parent / "core" / "config.py"
    assert '"NUMBA_CACHE_DIR"' in config.read_text()


def test_every_setting_is_documented() -> None:
    """Every CUTOUT_ variable a service reads is described in docs/configuration.md."""
    doc = (PROJECT_ROOT / "docs" / "configuration.md").read_text()
    missing = sorted(n for n in known_variables() if f"`{n}`" not in doc)
    assert not missing, f"docs/configuration.md does not describe {missing}"
