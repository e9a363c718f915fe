"""The environment is the lock: what `make install` put in .venv is exactly requirements/dev.lock,
and the locks satisfy pyproject's ranges. The client on the newest releases its ranges allow
(a new venv, a real gateway): tests/cluster/test_lock.py."""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.support.lockfile import LOCKS, OURS, differences, installed, pins, requirements

# Every environment a lock must serve: the dev venv and the images (Python 3.11 and 3.12, as
# Debian's and python:3.12-slim give), on both CPU architectures we build for.
ENVIRONMENTS = [
    {"python_version": v, "python_full_version": f"{v}.0", "platform_machine": m,
     "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
     "platform_python_implementation": "CPython", "implementation_name": "cpython"}
    for v in ("3.11", "3.12") for m in ("x86_64", "aarch64")
]  # fmt: skip
LOCK_EXTRAS = {  # lock -> (server extras, client extras) it is compiled from
    "dev.lock": (["cpu", "local", "dev"], ["cli"]),
    "cpu.lock": (["cpu"], ["cli"]),
    "gpu.lock": (["gpu"], ["cli"]),
}


def test_the_installed_environment_is_exactly_the_lock() -> None:
    locked = pins(LOCKS / "dev.lock")
    present = installed()
    assert {n: present.get(n) for n in OURS} == {n: "0.1.0" for n in OURS}
    wrong = differences(locked, {n: v for n, v in present.items() if n not in OURS})
    assert not wrong, "\n".join(["the venv is not requirements/dev.lock: `make install`", *wrong])


def test_the_comparison_names_every_kind_of_difference(tmp_path: Path) -> None:
    """The check above, on a real distribution whose metadata is altered on disk."""
    site = tmp_path / "site"
    dist = md.distribution("redis")
    assert dist.files is not None
    info = next(f for f in dist.files if f.parts[0].endswith(".dist-info"))
    folder = site / info.parts[0]
    folder.mkdir(parents=True)
    metadata = Path(str(dist.locate_file(info.parts[0]))) / "METADATA"
    (folder / "METADATA").write_text(metadata.read_text().replace(
        f"Version: {dist.version}", "Version: 0.0.1", 1))  # fmt: skip
    extra = site / "leftpad-1.0.dist-info"
    extra.mkdir()
    (extra / "METADATA").write_text("Metadata-Version: 2.1\nName: leftpad\nVersion: 1.0\n")
    present = installed(md.distributions(path=[str(site)]))
    assert differences({"redis": dist.version, "numpy": "2.0"}, present) == [
        "missing: numpy==2.0",
        "not in the lock: leftpad==1.0",
        f"redis: 0.0.1 installed, {dist.version} locked",
    ]


@pytest.mark.parametrize("lock", sorted(LOCK_EXTRAS))
def test_each_lock_satisfies_pyproject_everywhere(lock: str) -> None:
    """pyproject changed without `make lock` fails here, not on a fresh machine."""
    server_extras, client_extras = LOCK_EXTRAS[lock]
    for env in ENVIRONMENTS:
        locked = pins(LOCKS / lock, env)
        for req in requirements(server_extras, client_extras):
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = canonicalize_name(req.name)
            assert name in locked, f"{lock} lacks {req} on {env['python_version']}: make lock"
            assert req.specifier.contains(locked[name], prereleases=True), (
                f"{lock} pins {name}=={locked[name]}, pyproject asks {req}: make lock"
            )


def test_the_images_run_the_versions_the_venv_runs() -> None:
    for env in ENVIRONMENTS:
        dev = pins(LOCKS / "dev.lock", env)
        for lock in ("cpu.lock", "gpu.lock"):
            image = pins(LOCKS / lock, env)
            assert {n: v for n, v in image.items() if dev.get(n, v) != v} == {}, lock
        cpu, gpu = pins(LOCKS / "cpu.lock", env), pins(LOCKS / "gpu.lock", env)
        # The two ONNX Runtime distributions share their files: one per image, never both.
        assert {n for n in cpu if n.startswith("onnxruntime")} == {"onnxruntime"}
        assert {n for n in gpu if n.startswith("onnxruntime")} == {"onnxruntime-gpu"}
    assert pins(LOCKS / "uv.lock") == {"uv": pins(LOCKS / "dev.lock")["uv"]}
