"""The public API as a vendor sees it, on real processes with the tiny model."""

from __future__ import annotations

import asyncio
import io
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from cutout import AsyncClient, CutoutError
from cutout.client import build_submission
from cutout.v1 import jobs_pb2
from services.gateway.auth import new_key
from services.inference import pipeline
from services.inference.models import ModelCatalog
from services.local.cluster import LocalCluster
from tests.support.cluster import KEYS, start_cluster

A, B = KEYS["vendor-a"], KEYS["vendor-b"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("tiny"), tiny_model_dir)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[LocalCluster]:
    """A cluster whose only node never starts: every job stays queued."""
    cluster = start_cluster(tmp_path_factory.mktemp("idle"), tiny_model_dir, start_nodes=False)
    yield cluster
    cluster.stop()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data worth decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def local_alpha(model_dir: Path, data: bytes) -> np.ndarray:
    """The alpha the node pipeline gives for this input, run in this process."""
    catalog = ModelCatalog.load(model_dir, ["tiny"], ["CPUExecutionProvider"], 1)
    op = jobs_pb2.Operation()
    op.remove_background.SetInParent()
    out = pipeline.run(op, data, catalog, 40_000_000, lambda stage, percent: None)
    return np.asarray(Image.open(io.BytesIO(out.data)).getchannel("A"), dtype=np.float64)


async def finish(client: AsyncClient, name: str) -> jobs_pb2.Job:
    job = jobs_pb2.Job()
    async for event in client.watch(name):
        job = event.job
    return job


# --- waiting for nodes -----------------------------------------------------------------


async def test_job_waits_for_a_node_then_completes(
    make_cluster, tiny_model_dir: Path, photos: dict[str, bytes]
) -> None:  # type: ignore[no-untyped-def]
    cluster: LocalCluster = make_cluster(tiny_model_dir, nodes=1, start=False)
    cluster.start(start_nodes=False)
    async with AsyncClient(cluster.gateway_address, A) as client:
        job = await client.submit(photos["coffee"])
        await asyncio.sleep(1.5)  # several node polls: nobody can take it
        waiting = await client.get(job.name)
        assert waiting.state == jobs_pb2.JOB_STATE_QUEUED
        assert waiting.queue_position == 1
        assert (await client.stats()).healthy_nodes == 0
        await asyncio.to_thread(cluster.start_node, 0)
        done = await asyncio.wait_for(finish(client, job.name), 60)
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error.message
        _, data = await client.result(job.name)
        # The fleet says what it runs the model on (the node's own choice, see runtimes.py).
        (runtime,) = (await client.stats()).runtimes
        assert (runtime.model, runtime.device, runtime.nodes) == ("tiny", "cpu", 1)
        assert runtime.runtime in ("onnxruntime", "openvino") and runtime.precision
    ours = np.asarray(Image.open(io.BytesIO(data)).getchannel("A"), dtype=np.float64)
    # What went in is what the node computed: the same alpha as the pipeline run here.
    assert np.array_equal(ours, local_alpha(tiny_model_dir, photos["coffee"]))


async def test_a_job_of_milliseconds_still_shows_every_stage_in_order(
    tiny: LocalCluster, photos: dict[str, bytes]
) -> None:
    # The tiny model finishes within the node's progress hold, so its stages
    # travel with the output and are written with the completion.
    async with AsyncClient(tiny.gateway_address, A) as client:
        job = await client.submit(photos["chelsea"])
        seen = [event.job async for event in client.watch(job.name)]
    assert seen[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED, seen[-1].error.message
    assert list(dict.fromkeys(j.stage for j in seen)) == [
        jobs_pb2.STAGE_QUEUED,
        jobs_pb2.STAGE_DECODING,
        jobs_pb2.STAGE_INFERENCE,
        jobs_pb2.STAGE_COMPOSITING,
        jobs_pb2.STAGE_ENCODING,
        jobs_pb2.STAGE_STORING,
        jobs_pb2.STAGE_DONE,
    ]
    progress = [j.progress_percent for j in seen]
    assert progress == sorted(progress) and progress[-1] == 100


# --- identity and isolation ------------------------------------------------------------------


async def test_calls_without_a_valid_key_are_refused(idle: LocalCluster) -> None:
    for key in [new_key(), "not-even-a-key"]:
        async with AsyncClient(idle.gateway_address, key) as client:
            with pytest.raises(CutoutError) as err:
                await client.stats()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "API key" in err.value.message
    channel = grpc.aio.insecure_channel(idle.gateway_address)
    from cutout.v1 import cutout_service_pb2, cutout_service_pb2_grpc

    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await cutout_service_pb2_grpc.CutoutServiceStub(channel).GetQueueStats(
            cutout_service_pb2.GetQueueStatsRequest()
        )
    assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in (raw.value.details() or "")
    await channel.close()


async def test_another_vendors_job_does_not_exist_for_you(
    idle: LocalCluster, photos: dict[str, bytes]
) -> None:
    async with AsyncClient(idle.gateway_address, A) as a, AsyncClient(idle.gateway_address, B) as b:
        job = await a.submit(photos["chelsea"])
        calls = [b.get, b.cancel, b.result, lambda name: finish(b, name)]
        for call in calls:
            with pytest.raises(CutoutError) as err:
                await call(job.name)
            assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert job.name not in {j.name for j in (await b.list_jobs()).jobs}
        assert job.name in {j.name for j in (await a.list_jobs()).jobs}
        assert (await a.get(job.name)).state == jobs_pb2.JOB_STATE_QUEUED


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "content", "field", "code"),
    [
        ({}, b"", "submission.image.content", grpc.StatusCode.INVALID_ARGUMENT),
        (
            {},
            b"hello, I am a text file named photo.jpg",
            "submission.image.content",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            {},
            b"\xff\xd8\xff\xe0truncated",
            "submission.image.content",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            {},
            png_header_only(30000, 30000),
            "submission.image.content",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            {"model": "u2net-nope"},
            None,
            "submission.operation.remove_background.model",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ({"priority": 42}, None, "submission.priority", grpc.StatusCode.INVALID_ARGUMENT),
        (
            {"op": "crop-face", "mode": "square"},
            b"",
            "submission.image.content",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            {"output_format": "jpeg"},
            None,
            "submission.operation.remove_background.format",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            {"op": "transform", "resize": "fill", "width": 100},
            None,
            "submission.operation.transform.resize",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
async def test_bad_submissions_get_a_clear_error(
    idle: LocalCluster,
    photos: dict[str, bytes],
    options: dict[str, object],
    content: bytes | None,
    field: str | None,
    code: grpc.StatusCode,
) -> None:
    async with AsyncClient(idle.gateway_address, A) as client:
        with pytest.raises(CutoutError) as err:
            await client.submit(photos["coffee"] if content is None else content, **options)  # type: ignore[arg-type]
    assert err.value.code == code
    assert err.value.message
    if field:
        assert [f for f, _ in err.value.violations] == [field]
    if content is not None and content.startswith(b"\x89PNG"):
        assert "30000x30000" in err.value.message


async def test_unreachable_url_is_a_clear_invalid_argument(idle: LocalCluster) -> None:
    async with AsyncClient(idle.gateway_address, A) as client:
        with pytest.raises(CutoutError) as err:
            await client.submit("https://no-such-host.invalid/photo.jpg")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "host 'no-such-host.invalid' does not resolve" in err.value.message
    assert [f for f, _ in err.value.violations] == ["submission.image.uri"]


# --- queue operations -------------------------------------------------------------------------


async def test_cancel_a_queued_job(idle: LocalCluster, photos: dict[str, bytes]) -> None:
    async with AsyncClient(idle.gateway_address, A) as client:
        job = await client.submit(photos["coffee"])
        cancelled = await client.cancel(job.name)
        assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED and cancelled.done
        assert cancelled.error.code == grpc.StatusCode.CANCELLED.value[0]
        states = [j.state for j in [(e.job) async for e in client.watch(job.name)]]
        assert states == [jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_CANCELLED]
        again = await client.cancel(job.name)  # cancelling twice changes nothing
        assert again.state == jobs_pb2.JOB_STATE_CANCELLED
        with pytest.raises(CutoutError) as err:
            await client.result(job.name)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_list_pages_newest_first_and_filters(
    idle: LocalCluster, photos: dict[str, bytes]
) -> None:
    async with AsyncClient(idle.gateway_address, KEYS["vendor-b"]) as client:
        submitted = [(await client.submit(photos["coffee"])).name for _ in range(5)]
        await client.cancel(submitted[0])
        seen: list[str] = []
        token = ""
        while True:
            page = await client.list_jobs(page_size=2, page_token=token)
            assert len(page.jobs) <= 2
            seen += [j.name for j in page.jobs]
            token = page.next_page_token
            if not token:
                break
        assert seen[:5] == list(reversed(submitted))
        queued = await client.list_jobs(state=jobs_pb2.JOB_STATE_QUEUED, page_size=100)
        assert submitted[0] not in {j.name for j in queued.jobs}
        assert set(submitted[1:]) <= {j.name for j in queued.jobs}
        with pytest.raises(CutoutError) as err:
            await client.list_jobs(page_size=501)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_same_client_key_returns_the_same_job(
    idle: LocalCluster, photos: dict[str, bytes]
) -> None:
    async with AsyncClient(idle.gateway_address, A) as client:
        sub = build_submission(photos["coffee"], client_key="order-1234-photo-1")
        first = await client.submit_submission(sub)
        second = await client.submit_submission(sub)
    assert not first.deduplicated and second.deduplicated
    assert first.job.name == second.job.name


async def test_batch_items_succeed_or_fail_on_their_own(
    tiny: LocalCluster, photos: dict[str, bytes]
) -> None:
    async with AsyncClient(tiny.gateway_address, A) as client:
        reply = await client.submit_batch(
            [
                build_submission(photos["coffee"]),
                build_submission(b"not an image"),
                build_submission(photos["chelsea"], output_format="webp"),
            ]
        )
        assert reply.batch.startswith("batches/")
        assert [o.index for o in reply.outcomes] == [0, 1, 2]
        assert reply.outcomes[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "submissions[1].image.content" in reply.outcomes[1].error.message
        jobs = [reply.outcomes[0].job, reply.outcomes[2].job]
        assert all(j.batch == reply.batch for j in jobs)
        done = await asyncio.gather(*(finish(client, j.name) for j in jobs))
        assert [d.state for d in done] == [jobs_pb2.JOB_STATE_SUCCEEDED] * 2
        assert done[1].result.content_type == "image/webp"


# --- output options ---------------------------------------------------------------------------


async def test_output_options(tiny: LocalCluster, photos: dict[str, bytes]) -> None:
    original = Image.open(io.BytesIO(photos["astronaut"]))
    async with AsyncClient(tiny.gateway_address, A) as client:
        webp, mask, painted = await asyncio.gather(
            client.submit(photos["astronaut"], output_format="webp"),
            client.submit(photos["astronaut"], mask_only=True),
            client.submit(photos["astronaut"], background="ffffff"),
        )
        outputs = {}
        for name, job in {"webp": webp, "mask": mask, "painted": painted}.items():
            final = await finish(client, job.name)
            assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final.error.message
            result, data = await client.result(job.name)
            assert len(data) == result.size_bytes
            outputs[name] = Image.open(io.BytesIO(data))
    assert outputs["webp"].format == "WEBP" and outputs["webp"].mode == "RGBA"
    assert outputs["mask"].mode == "L" and outputs["mask"].size == original.size
    painted_img = outputs["painted"]
    assert painted_img.size == original.size
    assert np.asarray(painted_img.getchannel("A")).min() == 255  # opaque everywhere
    # Where the mask says background, the painted image is white.
    background = np.asarray(outputs["mask"]) == 0
    assert background.any()
    assert np.asarray(painted_img.convert("RGB"))[background].min() >= 254


async def test_exif_orientation_is_honoured(tiny: LocalCluster) -> None:
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 80, 3), dtype=np.uint8))
    exif = wide.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buf = io.BytesIO()
    wide.save(buf, "JPEG", exif=exif)
    async with AsyncClient(tiny.gateway_address, A) as client:
        job = await client.submit(buf.getvalue())
        final = await finish(client, job.name)
    assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert (final.result.width_px, final.result.height_px) == (40, 80)


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_submit_wait_writes_results(
    tiny: LocalCluster, tmp_path: Path, photos: dict[str, bytes]
) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("astronaut", "coffee"):
        (inputs / f"{name}.jpg").write_bytes(photos[name])
    env = {**os.environ, "CUTOUT_ADDR": tiny.gateway_address, "CUTOUT_API_KEY": A}
    cli = [sys.executable, "-m", "cutout.cli"]
    run = subprocess.run(
        [*cli, "submit", str(inputs), "--wait", "--out", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["astronaut.png", "coffee.png"]
    listed = subprocess.run([*cli, "list"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "succeeded" in listed.stdout
    bad = subprocess.run(
        [*cli, "submit", str(inputs / "astronaut.jpg"), "--model", "nope"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1
    assert "remove_background.model" in bad.stderr and "unknown model" in bad.stderr


def test_blocking_client_does_what_the_async_one_does(
    tiny: LocalCluster, tmp_path: Path, photos: dict[str, bytes]
) -> None:
    from cutout import Client

    with Client(tiny.gateway_address, A) as client:
        job = client.submit(photos["chelsea"], output_format="webp")
        states = [event.job.state for event in client.watch(job.name)]
        assert states[0] == jobs_pb2.JOB_STATE_QUEUED and states[-1] == jobs_pb2.JOB_STATE_SUCCEEDED
        result = client.save_result(job.name, tmp_path / "c.webp")
        with Image.open(tmp_path / "c.webp") as saved:
            assert saved.size == (result.width_px, result.height_px)
        assert job.name in {
            j.name for j in client.list_jobs(state=jobs_pb2.JOB_STATE_SUCCEEDED, page_size=500).jobs
        }
        batch = client.submit_batch([build_submission(photos["coffee"])])
        assert batch.outcomes[0].HasField("job")
        with pytest.raises(CutoutError) as err:
            client.get("jobs/" + "0" * 32)
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_one_blocking_client_serves_many_threads_and_stops_streams_left_early(
    tiny: LocalCluster, photos: dict[str, bytes]
) -> None:
    """Client runs every call on its own loop: threads share it, a watch abandoned after its
    first event cancels its call, and close() leaves no thread behind."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from cutout import Client

    before = {t.name for t in threading.enumerate()}
    with Client(tiny.gateway_address, A) as client:
        with ThreadPoolExecutor(8) as pool:
            jobs = list(pool.map(lambda _: client.submit(photos["chelsea"]), range(8)))
            assert len({j.name for j in jobs}) == 8
            got = list(pool.map(lambda j: client.get(j.name).name, jobs))
        assert got == [j.name for j in jobs]
        for job in jobs:
            for event in client.watch(job.name):
                assert event.job.name == job.name
                break  # leaving early closes the stream
        for job in jobs:
            assert [e.job.state for e in client.watch(job.name)][-1] == jobs_pb2.JOB_STATE_SUCCEEDED
    assert "cutout-client" not in {t.name for t in threading.enumerate()} - before
    with pytest.raises(CutoutError) as err:
        Client("127.0.0.1:1", api_key="")
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
