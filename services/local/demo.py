"""`make demo`: start a local cluster, send the sample photos through it, save the cutouts, stop.

Usage: python -m services.local.demo [--out DIR] [--nodes N]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from services.common.config import PROJECT_ROOT
from services.local.cluster import ClusterConfig, LocalCluster
from services.local.redis import free_port
from services.local.up import local_key

console = Console(soft_wrap=True)
SAMPLES = ("astronaut", "chelsea", "coffee")


def write_samples(folder: Path) -> list[Path]:
    """Real photos that ship with scikit-image (public domain), as JPEG files."""
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SAMPLES:
        path = folder / f"{name}.jpg"
        if not path.exists():
            Image.fromarray(getattr(skimage.data, name)()).save(path, quality=92)
        paths.append(path)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out", help="where the cutouts go (default ./out)")
    parser.add_argument("--nodes", type=int, default=2, help="inference nodes (default 2)")
    args = parser.parse_args()
    workdir = PROJECT_ROOT / "var"
    samples = write_samples(PROJECT_ROOT / "samples")
    key = local_key(workdir)
    # As `cutout-admin up` runs it: Envoy in front of two gateways, on a free port.
    cluster = LocalCluster(
        ClusterConfig(
            nodes=args.nodes,
            gateway_port=free_port(),
            gateways=2,
            envoy=True,
            workdir=workdir,
            api_keys={"local": key},
            supervise=True,
        ),
        echo=lambda line: console.print(line, markup=False),
    )
    started = time.monotonic()
    with console.status(
        f"starting redis, scheduler, {args.nodes} inference nodes, 2 gateways and Envoy..."
    ):
        cluster.start()
    elapsed = time.monotonic() - started
    console.print(f"cluster up in {elapsed:.1f}s; envoy {cluster.public_address}")
    try:
        env = {**os.environ, "CUTOUT_ADDR": cluster.public_address, "CUTOUT_API_KEY": key}
        cmd = [
            sys.executable,
            "-m",
            "cutout.cli",
            "submit",
            *map(str, samples),
            "--wait",
            "--out",
            args.out,
        ]
        console.print(
            "$ cutout submit "
            + " ".join(str(p.relative_to(PROJECT_ROOT)) for p in samples)
            + f" --wait --out {args.out}"
        )
        code = subprocess.run(cmd, env=env, check=False).returncode
    finally:
        with console.status("stopping the cluster..."):
            cluster.stop()
    written = sorted(Path(args.out).glob("*.png"))
    console.print(f"{len(written)} cutouts in {args.out}/: {', '.join(p.name for p in written)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
