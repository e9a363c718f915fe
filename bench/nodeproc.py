"""Start one inference node process for a benchmark; shared by bench/node.py and bench/memory.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "clients" / "python")]
from services.common.internal_auth import InternalToken, new_token  # noqa: E402

# The node refuses calls without the cluster's internal token: the bench is its scheduler.
TOKEN = InternalToken(new_token())
METADATA = TOKEN.metadata()


def start_node(
    model_dir: Path, model: str, capacity: int, workdir: Path, timeout_s: float = 300
) -> tuple[subprocess.Popen[bytes], str]:
    """python -m services.inference on a free loopback port; returns (process, address)."""
    ready = workdir / "node.ready"
    env = {
        **os.environ,
        "CUTOUT_MODEL_DIR": str(model_dir),
        "CUTOUT_MODELS": model,
        "CUTOUT_NODE_LISTEN": "127.0.0.1:0",
        "CUTOUT_NODE_CAPACITY": str(capacity),
        "CUTOUT_METRICS_LISTEN": "",
        "CUTOUT_READY_FILE": str(ready),
        "CUTOUT_LOG_LEVEL": "WARNING",
        "CUTOUT_INTERNAL_TOKEN": TOKEN.current,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'clients' / 'python'}",
    }
    log_path = workdir / "node.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.inference"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout_s
    while not (ready.exists() and ready.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the node did not start:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{ready.read_text().strip()}"
