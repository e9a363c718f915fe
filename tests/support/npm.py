"""Running npm in one of the TypeScript folders, for the tests that drive Node and Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from services.common.config import PROJECT_ROOT

TS = PROJECT_ROOT / "clients" / "ts"


def run_npm(
    folder: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> str:
    """npm ARGS in folder; fail with its whole output unless it exits 0.

    A missing npm or missing node_modules (of folder and of the TS client it builds on)
    fails the test, naming what to install: never a skip.
    """
    exe = shutil.which("npm")
    if exe is None:
        pytest.fail("npm is not on PATH: install Node 20 and npm (see README.md, TypeScript)")
    for needed in {folder / "node_modules", TS / "node_modules"}:
        if not needed.is_dir():
            pytest.fail(f"{needed} is missing: run `make install` (npm ci)")
    done = subprocess.run(
        [exe, *args],
        cwd=folder,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"npm {' '.join(args)} exited {done.returncode}:\n{output}"
    return output
