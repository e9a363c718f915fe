"""Batches: aggregate progress, whole-batch cancel, other vendors kept out, the CLI folder mode."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from cutout import AsyncClient, CutoutError
from cutout.client import build_submission
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS


async def test_watch_and_cancel_batches_scoped_to_their_vendor(
    make_cluster,
    tiny_model_dir: Path,
    photos: dict[str, bytes],  # type: ignore[no-untyped-def]
) -> None:
    cluster: LocalCluster = make_cluster(tiny_model_dir, nodes=1, start=False)
    cluster.start(start_nodes=False)
    addr, image = cluster.gateway_address, photos["coffee_small"]
    async with AsyncClient(addr, KEYS["vendor-a"]) as a, AsyncClient(addr, KEYS["vendor-b"]) as b:
        subs = [build_submission(image) for _ in range(5)] + [build_submission(b"not an image")]
        first = await a.submit_batch(subs)
        second = await a.submit_batch([build_submission(image) for _ in range(3)])
        watch = a.watch_batch(first.batch)
        now = await anext(watch)
        assert (now.total, now.queued, now.progress_percent, now.done) == (5, 5, 0, False)

        # Vendor B cannot watch or cancel A's batches: they do not exist for B.
        for call in (
            lambda: anext(b.watch_batch(first.batch)),
            lambda: b.cancel_batch(first.batch),
        ):
            with pytest.raises(CutoutError) as err:
                await call()
            assert err.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(CutoutError) as err:
            await a.cancel_batch("batches/" + "0" * 32)
        assert err.value.code == grpc.StatusCode.NOT_FOUND

        cancelled = await a.cancel_batch(second.batch)
        assert cancelled.cancelled == 3
        assert (cancelled.batch.cancelled, cancelled.batch.done) == (3, True)
        assert (await a.cancel_batch(second.batch)).cancelled == 0  # nothing left to cancel

        await asyncio.to_thread(cluster.start_node, 0)
        seen = [now]
        async for state in watch:
            seen.append(state)
        final = seen[-1]
        assert (final.total, final.succeeded, final.progress_percent, final.done) == (
            5,
            5,
            100,
            True,
        )
        percents = [s.progress_percent for s in seen]
        assert percents == sorted(percents), percents
        assert (await a.stats()).queued == 0


def test_cli_submits_a_folder_as_one_batch(
    make_cluster,
    tiny_model_dir: Path,
    photos: dict[str, bytes],
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    cluster: LocalCluster = make_cluster(tiny_model_dir, nodes=1)
    folder = tmp_path / "shop"
    folder.mkdir()
    for i in range(3):
        (folder / f"item{i}.jpg").write_bytes(photos["coffee_small"])
    (folder / "notes.txt").write_text("not an image, skipped by suffix")
    env = {**os.environ, "CUTOUT_ADDR": cluster.gateway_address, "CUTOUT_API_KEY": KEYS["vendor-a"]}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cutout.cli",
            "submit",
            str(folder),
            "--wait",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 of 3 images accepted" in done.stdout
    assert "3 of 3 succeeded" in done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "item0.png",
        "item1.png",
        "item2.png",
    ]
