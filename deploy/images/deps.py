"""Print the third-party requirements of the server with the given extras, one per line.

Run inside the image build on the project's pyproject.toml files alone, so that
the heavy dependency layer (onnxruntime, rembg, OpenCV, numba: minutes to
install) is rebuilt only when a pyproject changes, not on every code change.
The project's own distributions are installed afterwards with `--no-deps`, and
`pip check` then proves this list was complete.

    python deps.py SRC EXTRA [EXTRA...]

SRC holds pyproject.toml (the server) and clients/python/pyproject.toml (the
client). References to either distribution are expanded in place: the server's
own extras recursively, the client into its dependencies.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def name_of(req: str) -> tuple[str, list[str]]:
    match = REQUIREMENT.match(req)
    if not match:
        raise SystemExit(f"deps.py: cannot parse requirement {req!r}")
    return normalize(match[1]), [e.strip() for e in (match[2] or "").split(",") if e.strip()]


def load(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        project: dict[str, Any] = tomllib.load(f)["project"]
    return project


def requirements(server: dict[str, Any], client: dict[str, Any], extras: list[str]) -> list[str]:
    own = normalize(server["name"])
    client_name = normalize(client["name"])
    optional: dict[str, list[str]] = server.get("optional-dependencies", {})
    found: list[str] = []
    seen: set[str] = set()

    def add(reqs: list[str]) -> None:
        for req in reqs:
            name, wanted = name_of(req)
            if name == own:
                for extra in wanted:
                    add_extra(extra)
            elif name == client_name:
                add(client.get("dependencies", []))
            elif req not in found:
                found.append(req)

    def add_extra(extra: str) -> None:
        if extra in seen:
            return
        if extra not in optional:
            raise SystemExit(f"deps.py: the server has no extra {extra!r} ({', '.join(optional)})")
        seen.add(extra)
        add(optional[extra])

    add(server.get("dependencies", []))
    for extra in extras:
        add_extra(extra)
    return found


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    src, extras = Path(sys.argv[1]), sys.argv[2:]
    server = load(src / "pyproject.toml")
    client = load(src / "clients" / "python" / "pyproject.toml")
    print("\n".join(requirements(server, client, extras)))


if __name__ == "__main__":
    main()
