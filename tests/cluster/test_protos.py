"""The API definitions: lint clean, no unplanned breaking change, and the committed
generated code (Python, and TypeScript in clients/ts) is exactly what they generate."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.config import PROJECT_ROOT

# Loaded from its file: putting protos/ on sys.path would make protos/cutout shadow the
# `cutout` package as a namespace package for every test collected after this one.
_spec = importlib.util.spec_from_file_location("generate", PROJECT_ROOT / "protos" / "generate.py")
assert _spec is not None and _spec.loader is not None
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)

BUF = Path(sys.executable).parent / "buf"
BASELINE = PROJECT_ROOT / "protos" / "api-baseline.tar.gz"
TS_GEN = Path("clients/ts/src/gen")


def buf(*args: str, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    committed = generate.generated_files(PROJECT_ROOT)
    assert [p.relative_to(tmp_path) for p in fresh] == [
        p.relative_to(PROJECT_ROOT) for p in committed
    ]
    stale = [
        str(c.relative_to(PROJECT_ROOT))
        for p, c in zip(fresh, committed, strict=True)
        if p.read_bytes() != c.read_bytes()
    ]
    assert not stale, f"regenerate with `make protos`: {stale} differ from protos/"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_typescript_stubs_are_not_stale(tmp_path: Path) -> None:
    """clients/ts/src/gen is what buf.gen.ts.yaml makes from cutout.v1 and google.rpc now."""
    if not (PROJECT_ROOT / "clients/ts/node_modules/.bin/protoc-gen-es").exists():
        pytest.fail("protoc-gen-es is not installed: run `make install` (npm ci in clients/ts)")
    run = buf("generate", "--template", "buf.gen.ts.yaml", "--output", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    fresh = _files(tmp_path / TS_GEN)
    committed = _files(PROJECT_ROOT / TS_GEN)
    # The public package and the google.rpc messages its errors carry; never cutout.internal.
    assert sorted(fresh) == [
        "cutout/v1/cutout_service_pb.ts",
        "cutout/v1/jobs_pb.ts",
        "cutout/v1/webhooks_pb.ts",
        "google/rpc/error_details_pb.ts",
        "google/rpc/status_pb.ts",
    ]
    stale = sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))
    assert not stale, f"regenerate with `make ts`: {stale} in {TS_GEN} differ from protos/"


def test_buf_lint_passes() -> None:
    run = buf("lint")
    assert run.returncode == 0, run.stdout + run.stderr


def test_no_breaking_change_against_the_api_baseline() -> None:
    run = buf("breaking", "--against", str(BASELINE))
    assert run.returncode == 0, (
        "the API changed incompatibly since protos/api-baseline.tar.gz; if that is on "
        "purpose (a new major version), run `make api-baseline`\n" + run.stdout + run.stderr
    )


def _copy_workspace(to: Path) -> None:
    for part in ("buf.yaml", "protos", "third_party"):
        src = PROJECT_ROOT / part
        if src.is_dir():
            shutil.copytree(src, to / part, ignore=shutil.ignore_patterns("*.tar.gz"))
        else:
            shutil.copy(src, to / part)


def _drop_rpc(proto: Path, rpc: str) -> None:
    lines = proto.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"rpc {rpc}("))
    end = start if lines[start].rstrip().endswith(";") else start + 2  # "{", option, "}"
    proto.write_text("".join(lines[:start] + lines[end + 1 :]))


def test_the_public_package_is_checked_file_by_file(tmp_path: Path) -> None:
    """Dropping an RPC breaks every stub generated from cutout.v1 (FILE rules catch it);
    the internal package only keeps its wire and JSON form (services upgrade together)."""
    _copy_workspace(tmp_path)
    _drop_rpc(tmp_path / "protos/internal/cutout/internal/v1/inference_service.proto", "GetLoad")
    run = buf("breaking", "--against", str(BASELINE), cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr

    _drop_rpc(tmp_path / "protos/cutout/v1/cutout_service.proto", "GetQueueStats")
    run = buf("breaking", "--against", str(BASELINE), cwd=tmp_path)
    assert run.returncode != 0 and "GetQueueStats" in run.stdout, run.stdout + run.stderr
