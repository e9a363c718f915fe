"""Generate the Python code and type stubs from protos/.

Usage: python protos/generate.py [ROOT]   (default: the project root)

Two outputs, one per API:
- the public package `cutout.v1` (protos/cutout/v1) into clients/python/cutout/v1,
  what the client distribution ships;
- the internal package `cutout.internal.v1` (protos/internal/cutout/internal/v1)
  into services/internal/v1, importable as `services.internal.v1`, which only the
  services use and no client ever ships.

protoc names a generated module after its proto path, so internal modules first
come out as `cutout.internal.v1.*`; their import lines (and the module names
recorded in them) are rewritten to `services.internal.v1`. The descriptors, and
so the wire names (`cutout.internal.v1.SchedulerService`), are left as they are.

The output is reproducible: the same grpcio-tools and mypy-protobuf versions
(pinned in pyproject.toml) always give the same bytes, which is what
tests/cluster/test_protos.py checks to catch stale generated code.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_ROOT = ROOT / "protos"
INTERNAL_ROOT = ROOT / "protos" / "internal"
THIRD_PARTY = ROOT / "third_party" / "googleapis"
PUBLIC_OUT = Path("clients/python/cutout/v1")
INTERNAL_OUT = Path("services/internal/v1")
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
# Import statements of the internal package and the module names recorded in
# the code (`'cutout.internal.v1.inference_service_pb2'`); never the proto
# names (`'/cutout.internal.v1.InferenceService/Work'`), which are the wire's.
_INTERNAL_MODULE = re.compile(r"(?<=[\s'])cutout\.internal\.v1(?=( import |\.\w+_pb2))")


def _protoc(include_root: Path, files: list[Path], out_dir: Path) -> None:
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    # The mypy-protobuf plugins live beside the interpreter (venv/bin), which
    # need not be on PATH.
    bindir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{include_root}",
        f"-I{PUBLIC_ROOT}",
        f"-I{THIRD_PARTY}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(include_root)) for p in files),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generate(root: Path) -> list[Path]:
    """Generate both packages under root (a project-shaped folder); return the files."""
    public = sorted((PUBLIC_ROOT / "cutout" / "v1").glob("*.proto"))
    internal = sorted((INTERNAL_ROOT / "cutout" / "internal" / "v1").glob("*.proto"))
    (root / PUBLIC_OUT).mkdir(parents=True, exist_ok=True)
    _protoc(PUBLIC_ROOT, public, root / PUBLIC_OUT.parent.parent)
    with tempfile.TemporaryDirectory() as tmp:
        _protoc(INTERNAL_ROOT, internal, Path(tmp))
        out = root / INTERNAL_OUT
        out.mkdir(parents=True, exist_ok=True)
        for path in sorted((Path(tmp) / "cutout" / "internal" / "v1").iterdir()):
            if path.name.endswith(SUFFIXES):
                text = _INTERNAL_MODULE.sub("services.internal.v1", path.read_text())
                (out / path.name).write_text(text)
    return generated_files(root)


def generated_files(root: Path) -> list[Path]:
    return sorted(
        p
        for folder in (root / PUBLIC_OUT, root / INTERNAL_OUT)
        if folder.is_dir()
        for p in folder.iterdir()
        if p.name.endswith(SUFFIXES)
    )


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for stale in generated_files(target):
        stale.unlink()
    for path in generate(target):
        print(path.relative_to(target))
