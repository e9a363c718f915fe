"""Reading requirements/*.lock (uv pip compile's universal, hashed format) and comparing it
with an installed environment or with pyproject's ranges."""

from __future__ import annotations

import importlib.metadata as md
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from services.common.config import PROJECT_ROOT

LOCKS = PROJECT_ROOT / "requirements"
OURS = {"cutout-server", "cutout-client"}


def pins(lock: Path, environment: dict[str, str] | None = None) -> dict[str, str]:
    """name -> version of every entry of `lock` whose marker holds here (or in `environment`)."""
    found: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        if not line or line[0] in " #-":  # hashes, comments and options are indented or marked
            continue
        req = Requirement(line.rstrip(" \\"))
        if req.marker is not None and not req.marker.evaluate(environment):
            continue
        (spec,) = req.specifier
        assert spec.operator == "==", f"{lock.name}: {line!r} is not a pin"
        found[canonicalize_name(req.name)] = spec.version
    return found


def installed(distributions: Iterable[md.Distribution] | None = None) -> dict[str, str]:
    """name -> version of every distribution this interpreter sees."""
    dists = md.distributions() if distributions is None else distributions
    return {canonicalize_name(d.metadata["Name"]): d.version for d in dists}


def differences(locked: dict[str, str], present: dict[str, str]) -> list[str]:
    """What differs between the lock and an environment, one readable line each."""
    lines = [f"missing: {n}=={v}" for n, v in sorted(locked.items()) if n not in present]
    lines += [f"not in the lock: {n}=={v}" for n, v in sorted(present.items()) if n not in locked]
    lines += [
        f"{n}: {present[n]} installed, {v} locked"
        for n, v in sorted(locked.items())
        if n in present and present[n] != v
    ]
    return lines


def _project(path: Path) -> dict[str, object]:
    project: dict[str, object] = tomllib.loads(path.read_text())["project"]
    return project


def requirements(server_extras: Iterable[str], client_extras: Iterable[str]) -> list[Requirement]:
    """The third-party requirements of the server with these extras and the client with these,
    references between the two distributions expanded (as an install resolves them)."""
    server = _project(PROJECT_ROOT / "pyproject.toml")
    client = _project(PROJECT_ROOT / "clients" / "python" / "pyproject.toml")
    wanted = {"cutout-server": set(server_extras), "cutout-client": set(client_extras)}
    found: list[Requirement] = []
    todo = [("cutout-server", ""), ("cutout-client", "")]
    done: set[tuple[str, str]] = set()
    while todo:
        name, extra = todo.pop()
        if (name, extra) in done:
            continue
        done.add((name, extra))
        project = server if name == "cutout-server" else client
        if extra:
            reqs = project["optional-dependencies"][extra]  # type: ignore[index]
        else:
            reqs = project["dependencies"]
            todo += [(name, e) for e in wanted[name]]
        for text in reqs:  # type: ignore[attr-defined]
            req = Requirement(re.sub(r"\s+#.*", "", text))
            if canonicalize_name(req.name) in OURS:
                todo += [(canonicalize_name(req.name), e) for e in ["", *req.extras]]
            else:
                found.append(req)
    return found
