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
import tifffile
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from cutout import AsyncClient, CutoutError
from cutout.v1 import jobs_pb2
from services.common.internal_auth import InternalToken
from services.inference.service import pb as node_pb  # the node's own stubs, wherever
from services.local.cluster import LocalCluster, Service
from services.scheduler.work_link import NodeError
from tests.support import pngs
from tests.support.cluster import KEYS
from tests.support.node_link import NodeLink

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


def png_with(**chunks: list[bytes]) -> Callable[[], bytes]:
    return lambda: pngs.with_chunks(encoded(photo(), "PNG"), **chunks)


def png_cut_in_its_data() -> bytes:
    data = encoded(photo(), "PNG")
    return data[: len(data) // 2]


def apng() -> bytes:
    frames = [photo(), photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return encoded(frames[0], "PNG", save_all=True, append_images=frames[1:])


def tiff(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, samples)
    return buf.getvalue()


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
        "cannot be decoded",
        None,
    ),
    "PNG with a lying header": (lying_png, FAILS, "cannot be decoded", None),
    "PNG cut in its data": (png_cut_in_its_data, REFUSED, "is truncated", None),
    # 200 MB of text in ~200 KB: refused at intake, wherever the chunk is, after Pillow
    # inflates at most 1 MiB of it (once a ValueError: UNKNOWN at the gateway, or a job
    # retried 4 times and dead-lettered).
    "zTXt bomb after the image data": (
        png_with(after_idat=[pngs.ztxt(200 * MB)]),
        REFUSED,
        "decompression bomb",
        None,
    ),
    "iTXt bomb after the image data": (
        png_with(after_idat=[pngs.itxt(200 * MB)]),
        REFUSED,
        "decompression bomb",
        None,
    ),
    "zTXt bomb before the image data": (
        png_with(before_idat=[pngs.ztxt(200 * MB)]),
        REFUSED,
        "decompression bomb",
        None,
    ),
    "oversized ICC profile": (
        png_with(before_idat=[pngs.iccp(200 * MB)]),
        REFUSED,
        "decompression bomb",
        None,
    ),
    "65 MiB of text in 1 MiB chunks": (
        png_with(after_idat=[pngs.ztxt(pngs.MiB, b"k%d" % i) for i in range(65)]),
        REFUSED,
        "text chunks hold more than 64 MiB in all",
        None,
    ),
    "64-bit float TIFF": (
        lambda: tiff(np.zeros((100, 150))),
        REFUSED,
        "1 sample of 64-bit floating point",
        None,
    ),
    "uncompressed YCbCr TIFF": (
        lambda: encoded(photo().convert("YCbCr"), "TIFF"),
        REFUSED,
        "uncompressed YCbCr TIFF",
        None,
    ),
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
    "PNG with a little text after the image data": (
        png_with(after_idat=[pngs.ztxt(4096), pngs.text(b"hello")]),
        WORKS,
        "",
        (150, 100),
    ),
    "animated PNG": (apng, WORKS, "", (150, 100)),
}
# Bombs a node may still be sent (by a gateway of an older version, or another client of
# InferenceService): the attempt on its Work stream must end INVALID_ARGUMENT, which is
# never retried.
NODE_BOMBS = ("zTXt bomb after the image data", "oversized ICC profile")


def rss(service: Service) -> int:
    assert service.proc is not None
    with open(f"/proc/{service.proc.pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


UNKNOWN = grpc.StatusCode.UNKNOWN


async def outcome(client: AsyncClient, data: bytes) -> tuple[str, str, tuple[int, int] | None]:
    """What became of one submit; a library's exception surfacing as UNKNOWN fails here."""
    try:
        job = await client.submit(data)
    except CutoutError as exc:
        assert exc.code != UNKNOWN, f"UNKNOWN on submit: {exc.message}"
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT, exc
        return REFUSED, exc.message, None
    async for event in client.watch(job.name):
        final = event.job
    if final.state == jobs_pb2.JOB_STATE_SUCCEEDED:
        return WORKS, "", (final.result.width_px, final.result.height_px)
    assert final.state == jobs_pb2.JOB_STATE_FAILED, final
    assert final.error.code != UNKNOWN.value[0], f"job ended UNKNOWN: {final.error.message}"
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
    # 15 x len(CORPUS) bad inputs later: a leak of even a fraction of the 32 MB pixel bomb
    # or the 64 MiB of text per round would show.
    assert all(g < 40 for g in growth.values()), f"RSS grew by {growth} MB"
    for service in (gateway, node):
        with grpc.insecure_channel(service.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    # Past the gateway, straight to the node (on its Work stream, through the scheduler's
    # own WorkLink): a decoding error is still invalid input.
    op = jobs_pb2.Operation()
    op.remove_background.model = "tiny"
    token = InternalToken(cluster.config.internal_token)  # as the scheduler calls it
    async with NodeLink(node.address, token.metadata()) as direct:
        for attempt, name in enumerate(NODE_BOMBS, 1):
            job = node_pb.WorkJob(
                name="jobs/direct", attempt=attempt, operation=op, image=corpus[name][0]
            )
            with pytest.raises(NodeError) as ended:
                await direct.run(job, timeout_s=60)
            assert ended.value.code == grpc.StatusCode.INVALID_ARGUMENT, ended.value
            assert "submission.image.content" in ended.value.details
            assert "decompression bomb" in ended.value.details
