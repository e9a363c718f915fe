"""Light jobs (transforms, ID/square crops) have their own lane: never queued behind inference."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from cutout import AsyncClient
from cutout.v1 import jobs_pb2
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS
from tests.support.images import jpeg


async def test_a_transform_overtakes_a_backlog_of_background_removals(
    make_cluster,
    tiny_model_dir: Path,  # type: ignore[no-untyped-def]
) -> None:
    cluster: LocalCluster = make_cluster(
        tiny_model_dir, nodes=1, start=False, CUTOUT_NODE_CAPACITY="1"
    )
    cluster.start(start_nodes=False)  # everything queues first
    big = jpeg(np.tile(skimage.data.astronaut(), (3, 3, 1)))  # 1536x1536: slow to encode
    async with AsyncClient(cluster.gateway_address, KEYS["vendor-a"]) as client:
        heavy = [await client.submit(big) for _ in range(30)]
        light = await client.submit(
            skimage_file(), op="transform", resize="fit", width=100, output_format="jpeg"
        )
        square = await client.submit(jpeg(skimage.data.astronaut()), op="crop-face", mode="square")
        # Queued in its own lane: first in it, whatever waits for inference.
        assert (await client.get(light.name)).queue_position == 1
        assert (await client.get(heavy[-1].name)).queue_position == 30
        stats = await client.stats()
        assert stats.queued == 32
        await asyncio.to_thread(cluster.start_node, 0)
        for name in (light.name, square.name):
            async for event in client.watch(name):
                last = event.job
            assert last.state == jobs_pb2.JOB_STATE_SUCCEEDED, last
        done = [await client.get(j.name) for j in heavy]
        finished = sum(j.state == jobs_pb2.JOB_STATE_SUCCEEDED for j in done)
        # One inference slot, 30 jobs ahead: the light jobs did not wait for them.
        assert finished < 10, f"{finished} of 30 background removals finished first"
        result, data = await client.result(light.name)
        img = Image.open(io.BytesIO(data))
        assert (img.format, img.size) == ("JPEG", (100, 67))
        assert result.content_type == "image/jpeg" and not result.HasField("subject_box")
        result, data = await client.result(square.name)
        assert result.width_px == result.height_px and result.HasField("subject_box")
        for job in heavy:  # and the backlog itself still completes
            async for event in client.watch(job.name):
                last = event.job
            assert last.state == jobs_pb2.JOB_STATE_SUCCEEDED


def skimage_file() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(buf, "PNG")
    return buf.getvalue()


async def test_small_results_come_inline_and_large_ones_in_chunks_both_intact(
    make_cluster,
    tiny_model_dir: Path,  # type: ignore[no-untyped-def]
) -> None:
    """A node sends a result up to 1 MiB inside its output header, larger ones in chunks."""
    cluster: LocalCluster = make_cluster(tiny_model_dir, nodes=1)
    noise = np.random.default_rng(7).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG")  # incompressible: ~4.3 MB out as PNG
    async with AsyncClient(cluster.gateway_address, KEYS["vendor-a"]) as client:
        small = await client.submit(buf.getvalue(), op="transform", resize="fit", width=64)
        large = await client.submit(buf.getvalue(), op="transform")
        outputs = []
        for job in (small, large):
            async for event in client.watch(job.name):
                last = event.job
            assert last.state == jobs_pb2.JOB_STATE_SUCCEEDED, last
            result, data = await client.result(job.name)
            assert len(data) == result.size_bytes
            outputs.append((len(data), Image.open(io.BytesIO(data))))
        assert outputs[0][0] <= 1 << 20 and outputs[0][1].size == (64, 64)  # inline
        assert outputs[1][0] > 3 << 20  # over 1 MiB: sent in chunks
        # The large one came in chunks and was put back together byte for byte: PNG is
        # lossless, so its pixels are the input's.
        assert np.array_equal(np.asarray(outputs[1][1].convert("RGB")), noise)
