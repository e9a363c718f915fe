"""Generate the Python code and type stubs for protos/cutout/v1.

Usage: python protos/generate.py [OUT_DIR]   (default: clients/python)

The output is reproducible: the same grpcio-tools and mypy-protobuf versions
(pinned in pyproject.toml) always give the same bytes, which is what
tests/test_protos.py checks to catch stale generated code.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
THIRD_PARTY = ROOT / "third_party" / "googleapis"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "cutout" / "v1").glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into out_dir and return the files it wrote."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    # The mypy-protobuf plugins live beside the interpreter (venv/bin), which
    # need not be on PATH.
    bindir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{THIRD_PARTY}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    # protoc resolves relative proto paths against the include dirs.
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return generated_files(out_dir)


def generated_files(out_dir: Path) -> list[Path]:
    gen = out_dir / "cutout" / "v1"
    return sorted(
        p
        for p in gen.iterdir()
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"))
    )


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "clients" / "python"
    for path in generate(target):
        print(path.relative_to(target))
