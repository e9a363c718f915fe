"""The Kubernetes manifests name only settings the services really read."""

from __future__ import annotations

import re
from pathlib import Path

from services.common.config import PROJECT_ROOT

SETTINGS = sorted((PROJECT_ROOT / "services").glob("*/settings.py"))


def known_variables() -> set[str]:
    names: set[str] = set()
    common = PROJECT_ROOT / "services" / "common"
    for path in [*SETTINGS, common / "config.py", common / "internal_auth.py"]:
        names |= set(re.findall(r'"(CUTOUT_[A-Z0-9_]+)"', path.read_text()))
    return names


def test_manifests_use_only_real_settings() -> None:
    known = known_variables()
    used: dict[str, Path] = {}
    for manifest in (PROJECT_ROOT / "deploy" / "k8s").glob("*.yaml"):
        for name in re.findall(r"name: (CUTOUT_[A-Z0-9_]+)", manifest.read_text()):
            used[name] = manifest
    assert used, "no settings found in deploy/k8s"
    unknown = {n: str(p.name) for n, p in used.items() if n not in known}
    assert not unknown, f"manifests set variables no service reads: {unknown}"


def test_every_setting_is_documented() -> None:
    doc = (PROJECT_ROOT / "docs" / "configuration.md").read_text()
    missing = sorted(n for n in known_variables() if f"`{n}`" not in doc)
    assert not missing, f"docs/configuration.md does not describe {missing}"
