"""A corpus of bad and awkward inputs through live services: each gets its documented outcome,
and the gateway and the node keep serving with memory flat."""

from __future__ import annotations

import asyncio
import io
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from cutout import AsyncClient, CutoutError
from cutout.v1 import jobs_pb2
from services.local.cluster import LocalCluster, Service
from tests.conftest import KEYS

MB = 2**20
REFUSED, FAILS, WORKS = "refused at submit", "job fails", "works"


def encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w: int = 150, h: int = 100) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def lying_png() -> bytes:
    """A valid 64x48 PNG whose IHDR (CRC fixed up) claims 4000x3000."""
    data = bytearray(encoded(photo(64, 48), "PNG"))
    ihdr = data[8 + 8 : 8 + 8 + 13]
    ihdr[0:8] = struct.pack(">II", 4000, 3000)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return encoded(photo(150, 100), "JPEG", exif=exif)


# name -> (bytes, outcome, what the message must say, expected output size when it works)
CORPUS: dict[str, tuple[Callable[[], bytes], str, str, tuple[int, int] | None]] = {
    "zero bytes": (lambda: b"", REFUSED, "empty", None),
    "JPEG cut in its header": (lambda: encoded(photo(), "JPEG")[:600], REFUSED, "header", None),
    "JPEG cut in its data": (
        lambda: (lambda d: d[: len(d) * 2 // 3])(encoded(photo(), "JPEG")),
        FAILS,
        "cannot decode",
        None,
    ),
    "PNG with a lying header": (lying_png, FAILS, "cannot decode", None),
    "decompression bomb": (
        lambda: encoded(Image.new("1", (16000, 16000)), "PNG"),
        REFUSED,
        "megapixels",
        None,
    ),
    "30000x30000": (
        lambda: encoded(Image.new("1", (30000, 30000)), "PNG"),
        REFUSED,
        "30000x30000",
        None,
    ),
    "text named .jpg": (
        lambda: b"hello, I am not a photo\n" * 10,
        REFUSED,
        "not an image",
        None,
    ),
    "animated GIF": (
        lambda: encoded(
            photo().convert("P"), "GIF", save_all=True, append_images=[photo().convert("P")] * 3
        ),
        WORKS,
        "",
        (150, 100),
    ),
    "CMYK JPEG": (lambda: encoded(photo().convert("CMYK"), "JPEG"), WORKS, "", (150, 100)),
    "16-bit PNG": (
        lambda: encoded(Image.fromarray(np.full((100, 150), 40000, dtype=np.uint16)), "PNG"),
        WORKS,
        "",
        (150, 100),
    ),
    "EXIF-rotated photo": (exif_rotated, WORKS, "", (100, 150)),
}


def rss(service: Service) -> int:
    assert service.proc is not None
    with open(f"/proc/{service.proc.pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def outcome(client: AsyncClient, data: bytes) -> tuple[str, str, tuple[int, int] | None]:
    try:
        job = await client.submit(data)
    except CutoutError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT, exc
        return REFUSED, exc.message, None
    async for event in client.watch(job.name):
        final = event.job
    if final.state == jobs_pb2.JOB_STATE_SUCCEEDED:
        return WORKS, "", (final.result.width_px, final.result.height_px)
    assert final.state == jobs_pb2.JOB_STATE_FAILED, final
    assert final.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], final.error
    assert final.attempt == 1, "an invalid image must not be retried"
    return FAILS, final.error.message, None


@pytest.mark.timeout(600)
async def test_bad_inputs_get_their_documented_outcome_and_memory_stays_flat(
    make_cluster,
    tiny_model_dir: Path,  # type: ignore[no-untyped-def]
) -> None:
    cluster: LocalCluster = make_cluster(tiny_model_dir, nodes=1)
    corpus = {name: (make(), *rest) for name, (make, *rest) in CORPUS.items()}
    gateway, node = cluster.gateway, cluster.nodes[0]
    assert gateway is not None
    async with AsyncClient(cluster.gateway_address, KEYS["vendor-a"]) as client:

        async def round_() -> None:
            got = await asyncio.gather(*(outcome(client, d) for d, *_ in corpus.values()))
            for (name, (_, want, words, size)), (kind, message, out) in zip(
                corpus.items(), got, strict=True
            ):
                assert kind == want, f"{name}: {kind} ({message}), documented: {want}"
                assert words.lower() in message.lower(), f"{name}: {message!r}"
                assert out == size, f"{name}: output {out}, expected {size}"

        for _ in range(3):  # warm up: allocators and caches reach their working size
            await round_()
        before = {"gateway": rss(gateway), "node": rss(node)}
        for _ in range(15):
            await round_()
        after = {"gateway": rss(gateway), "node": rss(node)}
    growth = {k: (after[k] - before[k]) / MB for k in before}
    print(f"RSS growth over 15 rounds of the corpus, MB: {growth}")
    # 165 bad inputs later: a leak of even a fraction of the 32 MB bomb per round would show.
    assert all(g < 40 for g in growth.values()), f"RSS grew by {growth} MB"
    for service in (gateway, node):
        with grpc.insecure_channel(service.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
