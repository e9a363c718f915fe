"""The API definition: lint clean, and the committed generated code is what it generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from services.common.config import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "protos"))
import generate

COMMITTED = PROJECT_ROOT / "clients" / "python"


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    committed = generate.generated_files(COMMITTED)
    assert [p.name for p in fresh] == [p.name for p in committed]
    stale = [
        p.name for p, c in zip(fresh, committed, strict=True) if p.read_bytes() != c.read_bytes()
    ]
    assert not stale, f"regenerate with `make protos`: {stale} differ from protos/"


def test_buf_lint_passes() -> None:
    buf = Path(sys.executable).parent / "buf"
    run = subprocess.run(
        [str(buf), "lint"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr
