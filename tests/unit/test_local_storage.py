"""The local result store: outputs written together, each durable and each failing alone."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from services.scheduler.storage import LocalResultStore

JOB = "0123456789abcdef0123456789abcd{:02x}"


async def read_all(store: LocalResultStore, uri: str) -> bytes:
    return b"".join([chunk async for chunk in store.read(uri)])


async def test_outputs_written_together_each_land_whole_and_one_failure_stays_its_own(
    tmp_path: Path,
) -> None:
    store = LocalResultStore(tmp_path / "results")
    # 40 outputs at once, as a busy scheduler finishes them: written in groups.
    keys = [f"vendor-{i % 3}/{JOB.format(i)}.png" for i in range(40)]
    uris = await asyncio.gather(
        *(store.put(k, bytes([i]) * (1000 + i), "image/png") for i, k in enumerate(keys))
    )
    assert uris == [f"local:{k}" for k in keys]
    for i, uri in enumerate(uris):
        assert await read_all(store, uri) == bytes([i]) * (1000 + i)
    assert not list((tmp_path / "results").rglob(".*.tmp"))  # no temporary file left
    # A vendor folder removed under the store is made again; a folder that cannot be
    # made (a file in its place) fails only the outputs that go there.
    shutil.rmtree(tmp_path / "results" / "vendor-0")
    (tmp_path / "results" / "vendor-1").rename(tmp_path / "moved")
    (tmp_path / "results" / "vendor-1").write_bytes(b"not a folder")
    results = await asyncio.gather(
        store.put(f"vendor-0/{JOB.format(200)}.png", b"again", "image/png"),
        store.put(f"vendor-1/{JOB.format(201)}.png", b"lost", "image/png"),
        store.put(f"vendor-2/{JOB.format(202)}.png", b"fine", "image/png"),
        return_exceptions=True,
    )
    assert results[0] == f"local:vendor-0/{JOB.format(200)}.png"
    assert isinstance(results[1], OSError)
    assert results[2] == f"local:vendor-2/{JOB.format(202)}.png"
    assert await read_all(store, str(results[0])) == b"again"
    assert await read_all(store, str(results[2])) == b"fine"
    with pytest.raises(ValueError, match="unsafe storage key"):
        await store.put("../etc/passwd", b"x", "image/png")
