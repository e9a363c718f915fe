"""The `cutout` CLI as a newcomer meets it: output that survives pipes, user data shown as
given, and errors that say what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.local.cluster import LocalCluster
from services.local.redis import free_port
from tests.support.cluster import KEYS, start_cluster


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("cli"), tiny_model_dir, start_nodes=False)
    yield cluster
    cluster.stop()


def cutout(*args: str, addr: str = "") -> subprocess.CompletedProcess[str]:
    """The CLI with its output captured, as in a log or a CI job (not a terminal)."""
    env = {**os.environ, "CUTOUT_API_KEY": KEYS["vendor-a"], "COLUMNS": "80"}
    if addr:
        env["CUTOUT_ADDR"] = addr
    return subprocess.run(
        [sys.executable, "-m", "cutout.cli", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_messages_are_never_wrapped_off_a_terminal(tmp_path: Path) -> None:
    missing = tmp_path / ("a-rather-long-folder-name-" * 4) / "photo-of-a-product.jpg"
    run = cutout("submit", str(missing), addr="127.0.0.1:1")
    assert run.returncode == 1
    (line,) = [ln for ln in run.stderr.splitlines() if ln.startswith("refused")]
    assert str(missing) in line and len(line) > 120


def test_bracketed_addresses_in_messages_are_shown_as_given(idle: LocalCluster) -> None:
    url = "https://[fd00:ec2::254]/latest/meta-data"
    run = cutout("submit", url, addr=idle.gateway_address)
    assert run.returncode == 1
    assert f"refused {url}:" in run.stderr, run.stderr
    assert "INVALID_ARGUMENT" in run.stderr


def test_an_unreachable_gateway_names_the_address_and_what_to_do() -> None:
    addr = f"127.0.0.1:{free_port()}"
    run = cutout("status", "jobs/" + "0" * 32, addr=addr)
    assert run.returncode == 1
    assert "UNAVAILABLE" in run.stderr
    assert f"cannot reach a Cutout gateway at {addr}" in run.stderr
    assert "cutout-admin up" in run.stderr and "CUTOUT_ADDR" in run.stderr


def test_a_folder_submit_lists_what_it_skips_and_why(
    idle: LocalCluster, tmp_path: Path, photos: dict[str, bytes]
) -> None:
    folder = tmp_path / "shop"
    (folder / "old").mkdir(parents=True)
    (folder / "shoe.jpg").write_bytes(photos["coffee_small"])
    (folder / "notes.txt").write_text("not a picture")
    run = cutout("submit", str(folder), addr=idle.gateway_address)
    assert run.returncode == 0, run.stderr
    assert f"skipped {folder / 'notes.txt'}: not an image file (.txt)" in run.stderr
    assert f"skipped {folder / 'old'}: a folder" in run.stderr
    assert "1 of 1 images accepted" in run.stdout


def test_a_folder_goes_in_batches_that_fit_the_gateways_request_limit(
    idle: LocalCluster, tmp_path: Path
) -> None:
    """A batch is one request, at most the image limit plus 1 MiB (20 + 1 MiB): three 8 MB
    files (not images: each is refused on its own) go as two batches, never as one 24 MB
    request the gateway would refuse whole."""
    folder = tmp_path / "big"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (folder / name).write_bytes(bytes(8 * 10**6))
    run = cutout("submit", str(folder), addr=idle.gateway_address)
    assert "RESOURCE_EXHAUSTED" not in run.stderr, run.stderr
    batches = [" ".join(ln.split()[1:]) for ln in run.stdout.splitlines() if "accepted" in ln]
    assert batches == ["0 of 2 images accepted", "0 of 1 images accepted"], run.stdout
    assert run.returncode == 1  # the three were refused, each on its own: not images
