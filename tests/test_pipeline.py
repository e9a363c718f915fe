"""The node's image work as plain functions: every input mode decodes, errors are clear."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cutout.v1 import jobs_pb2
from services.inference import pipeline
from services.inference.models import ModelCatalog

MAX_PIXELS = 40_000_000


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
