"""The node's image work as plain functions: every input mode decodes, errors are clear."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from cutout.v1 import jobs_pb2
from services.inference import pipeline
from services.inference.masking import ISNET, MaskSession, Preprocessing
from services.inference.models import GatedModel, MaskModel, ModelCatalog
from services.inference.server import cpu_threads_per_run, session_runs

MAX_PIXELS = 40_000_000
ISNET_64 = Preprocessing((64, 64), ISNET.mean, ISNET.std)  # the tiny model's input


def encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb(w: int = 64, h: int = 48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))


INPUTS: dict[str, Callable[[], bytes]] = {
    "jpeg": lambda: encoded(rgb(), "JPEG"),
    "cmyk-jpeg": lambda: encoded(rgb().convert("CMYK"), "JPEG"),
    "grey-png": lambda: encoded(rgb().convert("L"), "PNG"),
    "16bit-png": lambda: encoded(Image.fromarray(np.full((48, 64), 40000, dtype=np.uint16)), "PNG"),
    "palette-png": lambda: encoded(rgb().convert("P"), "PNG"),
    "rgba-png": lambda: encoded(rgb().convert("RGBA"), "PNG"),
    "webp": lambda: encoded(rgb(), "WEBP"),
    "bmp": lambda: encoded(rgb(), "BMP"),
    "tiff": lambda: encoded(rgb(), "TIFF"),
    "animated-gif": lambda: encoded(
        rgb().convert("P"), "GIF", save_all=True, append_images=[rgb(64, 48).convert("P")]
    ),
}


@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_every_input_mode_decodes_to_rgb_or_rgba(kind: str) -> None:
    img = pipeline.decode(INPUTS[kind](), MAX_PIXELS)
    assert img.mode in ("RGB", "RGBA")
    assert img.size == (64, 48)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "cannot decode"),
        (b"plain text", "cannot decode"),
        (encoded(rgb(), "JPEG")[:200], "cannot decode"),
    ],
)
def test_undecodable_input_is_invalid_not_a_crash(data: bytes, words: str) -> None:
    with pytest.raises(pipeline.InvalidImage, match=words):
        pipeline.decode(data, MAX_PIXELS)


def test_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(pipeline.InvalidImage, match="64x48"):
        pipeline.decode(encoded(rgb(), "PNG"), max_pixels=1000)


def test_remove_background_reports_stages_in_order(tiny_model_dir: Path) -> None:
    os.environ["U2NET_HOME"] = str(tiny_model_dir)
    catalog = ModelCatalog.load(tiny_model_dir, ["tiny"], ["CPUExecutionProvider"], 1)
    assert catalog.models["tiny"].execution_provider == "CPUExecutionProvider"
    events: list[tuple[int, int]] = []
    op = jobs_pb2.Operation()
    op.remove_background.model = "tiny"
    out = pipeline.run(
        op, encoded(rgb(), "JPEG"), catalog, MAX_PIXELS, lambda s, p: events.append((s, p))
    )
    assert [s for s, _ in events] == [
        jobs_pb2.STAGE_DECODING,
        jobs_pb2.STAGE_INFERENCE,
        jobs_pb2.STAGE_COMPOSITING,
        jobs_pb2.STAGE_ENCODING,
        jobs_pb2.STAGE_ENCODING,
    ]
    assert [p for _, p in events] == sorted(p for _, p in events)
    assert out.content_type == "image/png" and (out.width, out.height) == (64, 48)
    assert Image.open(io.BytesIO(out.data)).mode == "RGBA"
    op.remove_background.model = "not-loaded"
    with pytest.raises(pipeline.Unsupported, match="not-loaded"):
        pipeline.run(op, encoded(rgb(), "JPEG"), catalog, MAX_PIXELS, lambda s, p: None)


def test_one_session_run_at_a_time_on_the_cpu_one_per_slot_on_a_gpu() -> None:
    assert session_runs(0, ["CPUExecutionProvider"], capacity=4) == 1
    assert session_runs(0, ["CUDAExecutionProvider", "CPUExecutionProvider"], capacity=4) == 4
    assert session_runs(3, ["CPUExecutionProvider"], capacity=4) == 3  # configured wins
    assert cpu_threads_per_run(1) == len(os.sched_getaffinity(0))


def test_gated_session_runs_one_at_a_time_while_jobs_overlap(tiny_model_dir: Path) -> None:
    real = ort.InferenceSession(str(tiny_model_dir / "tiny.onnx"))
    running, most = 0, 0
    lock = threading.Lock()

    class Watched:
        """The real session, counting the runs under way at once."""

        def get_inputs(self) -> list[ort.NodeArg]:
            return real.get_inputs()

        def run(self, names: None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
            time.sleep(0.05)  # long enough for the other threads to arrive
            try:
                return real.run(names, feed)
            finally:
                with lock:
                    running -= 1

    def gated(runs: int) -> MaskModel:
        return MaskSession(cast(ort.InferenceSession, Watched()), ISNET_64, runs)

    img = rgb(200, 150)
    # Cutout's own session gates session.run; a rembg session is gated around predict.
    # Without a gate the four callers' runs overlap (how many at once is up to the OS).
    for session, overlap in ((gated(1), False), (gated(0), True), (GatedModel(gated(0), 1), False)):
        running, most = 0, 0
        with ThreadPoolExecutor(4) as pool:
            masks = list(pool.map(lambda _, s=session: s.predict(img)[0], range(8)))
        assert (most > 1) if overlap else (most == 1), most
        assert all(m.size == img.size for m in masks)
