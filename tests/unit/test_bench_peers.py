"""The benchmarks' own tools, for correctness only: bench/peers.py does a node's work (the
tiny model's cutout, as a PNG). Its arq and Celery workers, and bench/fixed_node.py behind a
real scheduler, run in tests/cluster/test_bench_peers.py."""

from __future__ import annotations

import sys
from pathlib import Path

from cutout.v1 import jobs_pb2

ROOT = Path(__file__).resolve().parents[2]  # the checkout: bench/ is imported from it
sys.path.insert(0, str(ROOT))

from bench import peers  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def test_peer_work_is_the_nodes_work(tiny_model_dir: Path) -> None:
    catalog = peers.load_catalog(tiny_model_dir)
    png = peers.work(catalog, peers.small_jpeg())
    assert png.startswith(PNG)
    assert peers.OPERATION.remove_background.format == jobs_pb2.OUTPUT_FORMAT_PNG
