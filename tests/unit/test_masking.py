"""The node's steps around the model: the same pixels as rembg's where they claim to be.

Cheap checks, no model run: the input tensor against rembg's own
normalisation, the cutout against rembg's naive_cutout byte for byte, the
mask's resize filter, and PNG encoding (lossless, strategy by content).
"""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from cutout.v1 import jobs_pb2
from services.inference import pipeline
from services.inference.masking import ISNET, MaskSession, to_size
from tests.support.tinymodel import build_tiny_model


def photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def rembg_input(img: Image.Image) -> np.ndarray:
    """rembg 2.0.86's BaseSession.normalize for IS-Net, without a session."""
    im = np.array(img.convert("RGB").resize(ISNET.size, Image.Resampling.LANCZOS))
    im = im / max(np.max(im), 1e-6)
    out = np.zeros((*im.shape[:2], 3))
    for c in range(3):
        out[:, :, c] = (im[:, :, c] - ISNET.mean[c]) / ISNET.std[c]
    return np.expand_dims(out.transpose((2, 0, 1)), 0).astype(np.float32)


@pytest.fixture(scope="module")
def masks(tmp_path_factory: pytest.TempPathFactory) -> MaskSession:
    """A MaskSession on the tests' tiny model built at IS-Net's input size (1024 x 1024)."""
    path = build_tiny_model(tmp_path_factory.mktemp("tiny1024") / "tiny.onnx", size=1024)
    return MaskSession(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), ISNET)


def test_preprocess_matches_rembgs_input(masks: MaskSession) -> None:
    small = photo("astronaut")  # 512 x 512: enlarged with LANCZOS, as rembg does
    assert np.abs(masks.preprocess(small) - rembg_input(small)).max() < 1e-5
    large = small.resize((3000, 2000), Image.Resampling.BICUBIC)  # shrunk with bilinear
    diff = np.abs(masks.preprocess(large) - rembg_input(large))
    # Bilinear against LANCZOS: sharp edges differ by up to ~20/255, the mean by 0.4/255
    # (the masks that come out of it: tests/unit/test_runtimes.py, "coffee x3").
    assert diff.mean() < 0.5 / 255 and diff.max() < 32 / 255
    grey = photo("camera").convert("L")
    assert np.abs(masks.preprocess(grey) - rembg_input(grey)).max() < 1e-5
    # Into a caller's buffer, which it returns.
    buf = np.empty((1, 3, 1024, 1024), dtype=np.float32)
    assert masks.preprocess(small, buf) is buf
    assert np.array_equal(buf, masks.preprocess(small))


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_cutout_is_rembgs_naive_cutout_byte_for_byte(mode: str) -> None:
    from rembg.bg import naive_cutout

    img = photo("coffee").convert(mode)
    if mode == "RGBA":
        alpha = np.linspace(0, 255, img.width * img.height).reshape(img.height, img.width)
        img.putalpha(Image.fromarray(alpha.astype(np.uint8)))
    mask = Image.fromarray(np.random.default_rng(1).integers(0, 256, img.size[::-1], np.uint8))
    ours, theirs = pipeline.naive_cutout(img, mask), naive_cutout(img, mask)
    assert ours.mode == theirs.mode == "RGBA"
    assert ours.tobytes() == theirs.tobytes()


def test_mask_is_shrunk_with_lanczos_and_enlarged_with_bilinear() -> None:
    mask = Image.fromarray(np.random.default_rng(2).integers(0, 256, (1024, 1024), np.uint8))
    lanczos, bilinear = Image.Resampling.LANCZOS, Image.Resampling.BILINEAR
    for size, flt in (((640, 427), lanczos), ((1800, 900), lanczos), ((2048, 1536), bilinear)):
        assert to_size(mask, size).tobytes() == mask.resize(size, flt).tobytes()
    assert to_size(mask, (1024, 1024)) is mask


@pytest.mark.parametrize("name", ["coffee", "camera"])
def test_png_output_is_lossless_whichever_strategy(name: str) -> None:
    img = photo(name).convert("RGBA")
    out = pipeline.encode(img, jobs_pb2.OUTPUT_FORMAT_UNSPECIFIED)
    assert out.content_type == "image/png"
    assert Image.open(io.BytesIO(out.data)).tobytes() == img.tobytes()
    assert pipeline._grey(img) == (name == "camera")


def test_subject_box_is_the_box_of_the_half_opaque_pixels() -> None:
    rng = np.random.default_rng(3)
    for _ in range(100):
        alpha = np.zeros((int(rng.integers(1, 40)), int(rng.integers(1, 40))), np.uint8)
        for _ in range(int(rng.integers(0, 5))):
            y, x = rng.integers(0, alpha.shape[0]), rng.integers(0, alpha.shape[1])
            alpha[y, x] = rng.integers(0, 256)
        ys, xs = np.nonzero(alpha >= 128)
        want = None
        if ys.size:
            want = (int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1)
        assert pipeline.subject_box(Image.fromarray(alpha)) == want, alpha
