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
from tests.support import pngs

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


def png_cut_in_its_data() -> bytes:
    data = encoded(rgb(), "PNG")
    return data[: data.index(b"IEND") - 100]


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "is empty"),
        (b"plain text", "is not an image this service reads"),
        (encoded(rgb(), "JPEG")[:200], "JPEG but its header is unreadable"),
        (encoded(rgb(), "JPEG")[:1500], "cannot be decoded: image file is truncated"),
        (png_cut_in_its_data(), "cannot be decoded"),
        # Pillow raises ValueError for these (once an UNKNOWN error, retried 4 times):
        (pngs.with_chunks(encoded(rgb(), "PNG"), after_idat=[pngs.ztxt(200 * pngs.MB)]), "bomb"),
        (pngs.with_chunks(encoded(rgb(), "PNG"), after_idat=[pngs.itxt(200 * pngs.MB)]), "bomb"),
        (pngs.with_chunks(encoded(rgb(), "PNG"), before_idat=[pngs.ztxt(200 * pngs.MB)]), "bomb"),
        (pngs.with_chunks(encoded(rgb(), "PNG"), before_idat=[pngs.iccp(200 * pngs.MB)]), "bomb"),
        (
            # 65 chunks of 1 MB of text each: no chunk over the limit, their sum is
            pngs.with_chunks(
                encoded(rgb(), "PNG"),
                after_idat=[pngs.ztxt(pngs.MiB, b"k%d" % i) for i in range(65)],
            ),
            "text chunks hold more than 64 MiB in all",
        ),
    ],
    ids=[
        "empty",
        "text",
        "JPEG cut in its header",
        "JPEG cut in its data",
        "PNG cut in its data",
        "zTXt bomb after IDAT",
        "iTXt bomb after IDAT",
        "zTXt bomb before IDAT",
        "ICC profile bomb",
        "too much text",
    ],
)
def test_undecodable_input_is_invalid_not_a_crash(data: bytes, words: str) -> None:
    """Every way decoding fails is InvalidImage (INVALID_ARGUMENT, never retried), with the
    field and what is wrong; never a library's own exception (UNKNOWN, retried)."""
    with pytest.raises(pipeline.InvalidImage, match=words) as refused:
        pipeline.decode(data, MAX_PIXELS)
    assert str(refused.value).startswith("submission.image.content ")


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


def test_the_mask_is_rounded_so_its_maximum_is_opaque() -> None:
    # A prediction whose range, in float32, scales its maximum to 254.99998 (found by search):
    # truncated, that pixel was 254 and no pixel of any cutout was ever fully opaque.
    lo, hi = np.float32(0.109918736), np.float32(0.5137796)
    pred = np.linspace(lo, hi, 64 * 64, dtype=np.float32).reshape(1, 1, 64, 64)
    pred[0, 0, -1, -1] = hi
    mask = np.asarray(MaskSession.postprocess(pred, (64, 64)))
    assert (mask.min(), mask.max()) == (0, 255)


@pytest.fixture(scope="module")
def real_catalog(real_model_dir: Path) -> ModelCatalog:
    return ModelCatalog.load(real_model_dir, ["isnet-general-use"], ["CPUExecutionProvider"], 1)


@pytest.mark.parametrize("name", ["astronaut", "chelsea"])
def test_an_opaque_subject_comes_out_fully_opaque_and_the_background_fully_clear(
    real_catalog: ModelCatalog, photos: dict[str, bytes], name: str
) -> None:
    op = jobs_pb2.Operation()
    op.remove_background.model = "isnet-general-use"
    out = pipeline.run(op, photos[name], real_catalog, MAX_PIXELS, lambda s, p: None)
    alpha = np.asarray(Image.open(io.BytesIO(out.data)).getchannel("A"))
    assert alpha.max() == 255, f"the most opaque pixel has alpha {alpha.max()}"
    assert alpha.min() == 0
    # Not one stray pixel: the subject's inside is (the astronaut's ~40 % of the photo, the
    # cat's ~4 %).
    assert (alpha == 255).mean() > 0.02, (alpha == 255).mean()


def test_an_output_too_large_for_its_format_is_invalid_not_an_encoder_crash(
    tiny_model_dir: Path,
) -> None:
    catalog = ModelCatalog.load(tiny_model_dir, ["tiny"], ["CPUExecutionProvider"], 1)
    wide = encoded(Image.new("RGB", (16384, 8), (200, 100, 50)), "PNG")
    op = jobs_pb2.Operation()
    op.transform.format = jobs_pb2.OUTPUT_FORMAT_WEBP
    with pytest.raises(pipeline.InvalidImage, match="16384x8 and WebP holds at most 16383"):
        pipeline.run(op, wide, catalog, MAX_PIXELS, lambda s, p: None)
    op.transform.format = jobs_pb2.OUTPUT_FORMAT_PNG
    out = pipeline.run(op, wide, catalog, MAX_PIXELS, lambda s, p: None)
    assert (out.width, out.height) == (16384, 8)
