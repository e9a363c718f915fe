"""Every pixel mode and bit depth of every format the service takes comes out as the same
picture, or is refused at intake with the mode named.

Each case is a gradient written in one mode (and compression, and bit depth) that Pillow,
OpenCV's PNG writer, tifffile or tests/pngs.py can write. Its truth is computed here with
numpy from the samples themselves (not through Pillow's conversions, which are what is under
test). The bytes go through the gateway's `intake.validate` and then the node's
`pipeline.run`: a transform (decode, encode, nothing else, so the output must match the truth
block by block) and a background removal with the tiny model (whose mask must follow the
picture: it is sigmoid(8 x the channel mean), so a picture turned white or black gives a
blank mask).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms, JpegImagePlugin, TiffImagePlugin

from cutout.v1 import jobs_pb2
from services.common.errors import CutoutError
from services.gateway import intake
from services.inference import pipeline
from services.inference.models import ModelCatalog
from tests.support import pngs

W, H = 64, 48
BLOCK = 8  # truth and output are compared as means over 8 x 8 blocks
LIMITS = intake.Limits(max_image_bytes=1 << 24, max_pixels=1_000_000, models=("tiny",))

X = np.linspace(0.0, 1.0, W)[None, :].repeat(H, 0)
Y = np.linspace(0.0, 1.0, H)[:, None].repeat(W, 1)
GREY = 0.8 * X + 0.2 * Y  # 0 (black) at the top left to 1 (white) at the bottom right
# A different ramp in each channel, so that swapped or inverted channels show.
COLOUR = np.stack([X, Y, 1.0 - 0.5 * (X + Y)], axis=-1)
ALPHA = 0.5 + 0.5 * Y  # never 0: lossy WebP may change the colour under transparent pixels


def u8(unit: np.ndarray) -> np.ndarray:
    return np.rint(unit * 255).astype(np.uint8)


def grey3(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


@dataclass(frozen=True)
class Source:
    """An image in one Pillow mode and the picture it holds (H x W x 3, alpha H x W, in 0-1)."""

    image: Image.Image
    rgb: np.ndarray
    alpha: np.ndarray | None = None


def palette_rgb(img: Image.Image) -> np.ndarray:
    palette = np.asarray(img.getpalette(), dtype=np.float64).reshape(-1, 3) / 255
    return palette[np.asarray(img.getchannel(0) if img.mode == "PA" else img)]


def _eight_bit(mode: str, colors: int) -> Source:
    """Modes of 8-bit samples (and 1-bit, and palettes) made from the gradients."""
    rgb8, alpha8, grey8 = (Image.fromarray(u8(a)) for a in (COLOUR, ALPHA, GREY))
    truth_rgb, truth_alpha = u8(COLOUR) / 255, u8(ALPHA) / 255
    if mode == "1":
        img = grey8.convert("1")  # Floyd-Steinberg dithering keeps the local mean
        return Source(img, grey3(np.asarray(img, dtype=np.float64)))
    if mode in ("L", "LA"):
        img = grey8 if mode == "L" else Image.merge("LA", [grey8, alpha8])
        return Source(img, grey3(u8(GREY) / 255), truth_alpha if mode == "LA" else None)
    if mode in ("P", "PA"):
        img = rgb8.quantize(colors)
        if mode == "P":
            return Source(img, palette_rgb(img))
        img = img.convert("PA")
        img.putalpha(alpha8)
        return Source(img, palette_rgb(img), truth_alpha)
    if mode in ("RGBA", "RGBa"):
        # RGBa holds colour premultiplied by alpha; un-premultiplying loses < 1/255 at alpha >= 0.5
        return Source(
            Image.merge("RGBA", [*rgb8.split(), alpha8]).convert(mode), truth_rgb, truth_alpha
        )
    if mode == "CMYK":
        img = rgb8.convert("CMYK")
        cmyk = np.asarray(img, dtype=np.float64) / 255
        return Source(img, (1 - cmyk[..., :3]) * (1 - cmyk[..., 3:]))  # the naive formula
    if mode == "LAB":
        to_lab = ImageCms.buildTransform(
            ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
        )
        lab = ImageCms.applyTransform(rgb8, to_lab)
        assert lab is not None
        return Source(lab, truth_rgb)
    assert mode in ("RGB", "RGBX", "YCbCr", "HSV"), mode
    return Source(rgb8.convert(mode), truth_rgb)


def source(mode: str, full_scale_i: int = 2**31 - 1, colors: int = 256) -> Source:
    """The gradient in `mode`; mode I holds GREY x full_scale_i, I;16 GREY x 65535."""
    if mode == "I":
        samples = np.rint(GREY * full_scale_i).astype(np.int32)
        return Source(Image.fromarray(samples), grey3(samples / full_scale_i))
    if mode.startswith("I;16"):
        order = {"I;16": "<", "I;16L": "<", "I;16B": ">", "I;16N": "="}[mode]
        samples = np.rint(GREY * 65535).astype(f"{order}u2")
        return Source(Image.frombytes(mode, (W, H), samples.tobytes()), grey3(samples / 65535))
    if mode == "F":
        return Source(Image.fromarray(GREY.astype(np.float32)), grey3(GREY))
    return _eight_bit(mode, colors)


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    rgb: np.ndarray  # the picture, H x W x 3 in 0-1
    alpha: np.ndarray | None  # None: compare colour only (the file keeps no alpha)
    tolerance: float  # largest difference of an 8 x 8 block mean, in 0-1
    refused: str = ""  # when set: intake refuses, naming this


def saved(img: Image.Image, fmt: str, **options: object) -> bytes | None:
    """The image written by Pillow, or None where Pillow does not write it (or deprecates it)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            img.save(buf, fmt, **options)
        except (OSError, ValueError, KeyError, TypeError, DeprecationWarning):
            return None
    return buf.getvalue()


LOSSLESS = 1.5 / 255
# Changes a writer or a colour conversion makes, not the decoder: YCbCr and LAB round trips,
# chroma subsampling and quantisation of the lossy codecs.
TOLERANCE = {"YCbCr": 3 / 255, "LAB": 0.06, "jpeg": 0.04, "JPEG": 0.04, "webp-lossy": 0.04}
TIFF_COMPRESSIONS = [None, "tiff_lzw", "tiff_adobe_deflate", "packbits", "jpeg", "group4"]
# libtiff's JPEG codec takes 8-bit samples and Group 4 bilevel ones; asked for other modes,
# Pillow 12.3's TIFF writer corrupts the heap (the process aborts), so the sweep never asks.
TIFF_ONLY_FOR = {
    "jpeg": {"L", "LA", "RGB", "RGBX", "RGBA", "CMYK", "YCbCr", "LAB"},
    "group4": {"1"},
}
# What Pillow writes an I image as: 16-bit samples in PNG (deprecated), signed 32-bit in TIFF.
FULL_SCALE_I = {"PNG": 65535, "TIFF": 2**31 - 1}
# Uncompressed YCbCr TIFF: Pillow writes it, then reads the 3-sample pixels as 4-sample RGBX.
REFUSED = {("TIFF", "YCbCr", None): "YCbCr"}


def pillow_cases() -> list[Case]:
    """Every mode each format's Pillow writer takes without converting it first."""
    plans: list[tuple[str, str, dict[str, object], str]] = []  # format, mode, options, label
    for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "I;16B"):
        plans.append(("PNG", mode, {}, ""))
    for bits in (1, 2, 4):  # palette PNGs of 2, 4 and 16 colours
        plans.append(("PNG", "P", {"bits": bits}, f"{bits}-bit"))
    for mode in TiffImagePlugin.SAVE_INFO:
        for compression in TIFF_COMPRESSIONS:
            if compression in TIFF_ONLY_FOR and mode not in TIFF_ONLY_FOR[compression]:
                continue
            plans.append(("TIFF", mode, {"compression": compression}, compression or "raw"))
    for mode in ("RGB", "RGBA"):
        plans.append(("WEBP", mode, {"lossless": True}, "lossless"))
        plans.append(("WEBP", mode, {"quality": 90}, "webp-lossy"))
    for mode in JpegImagePlugin.RAWMODE:
        plans.append(("JPEG", mode, {"quality": 95}, ""))
    for mode in ("L", "P"):
        plans.append(("GIF", mode, {}, ""))
    for mode in ("1", "L", "P", "RGB"):
        plans.append(("BMP", mode, {}, ""))

    cases = []
    for fmt, mode, options, label in plans:
        bits = options.get("bits")
        src = source(mode, FULL_SCALE_I.get(fmt, 2**31 - 1), 2 ** int(bits) if bits else 256)
        data = saved(src.image, fmt, **options)
        if data is None:
            continue
        keeps_alpha = fmt in ("PNG", "TIFF", "WEBP")
        tolerance = max(TOLERANCE.get(mode, LOSSLESS), TOLERANCE.get(label or fmt, LOSSLESS))
        refused = REFUSED.get((fmt, mode, options.get("compression")), "")
        cases.append(
            Case(
                f"{fmt}-{mode}-{label}".rstrip("-"),
                data,
                src.rgb,
                src.alpha if keeps_alpha else None,
                tolerance,
                refused,
            )
        )
    return cases


def transparent_cases() -> list[Case]:
    """PNG's tRNS chunk: one grey level, one RGB colour, or per-palette-entry alpha."""
    grey8, rgb8 = u8(GREY), u8(COLOUR)
    key_grey = int(grey8[0, 0])  # the darkest corner is the transparent colour
    key_rgb = tuple(int(c) for c in rgb8[0, 0])
    palette = Image.fromarray(rgb8).quantize(256)
    entry_alpha = bytes([128] + [255] * 255)  # entry 0 half transparent
    grey16 = np.rint(GREY * 65535).astype(np.uint16)
    out = []
    for name, img, options, alpha in [
        ("L", Image.fromarray(grey8), {"transparency": key_grey}, grey8 != key_grey),
        ("RGB", Image.fromarray(rgb8), {"transparency": key_rgb}, (rgb8 != key_rgb).any(-1)),
        ("P", palette, {"transparency": entry_alpha}, None),
        ("I;16", Image.fromarray(grey16), {"transparency": int(grey16[0, 0])}, None),
    ]:
        data = saved(img, "PNG", **options)
        assert data is not None, name
        if name == "P":
            alpha = np.where(np.asarray(palette) == 0, 128 / 255, 1.0)
        if name == "I;16":
            alpha = grey16 != grey16[0, 0]
        truth = palette_rgb(palette) if name == "P" else source(name, 65535).rgb
        out.append(Case(f"PNG-{name}-tRNS", data, truth, np.asarray(alpha, float), LOSSLESS))
    return out


def other_writer_cases() -> list[Case]:
    """Bit depths and sample formats Pillow reads but does not write."""
    out = []
    for bits in (1, 2, 4, 16):  # grey PNGs below and above 8 bits
        top = 2**bits - 1
        samples = np.rint(GREY * top).astype(np.uint16)
        out.append(
            Case(
                f"PNG-grey-{bits}-bit",
                pngs.raw_png(samples, bits),
                grey3(samples / top),
                None,
                LOSSLESS,
            )
        )
    grey16 = np.rint(GREY * 65535).astype(np.uint16)
    alpha16 = np.rint(ALPHA * 65535).astype(np.uint16)
    colour16 = np.rint(COLOUR * 65535).astype(np.uint16)
    out.append(
        Case(
            "PNG-grey+alpha-16-bit",
            pngs.raw_png(np.stack([grey16, alpha16], -1), 16),
            grey3(GREY),
            ALPHA,
            LOSSLESS,
        )
    )
    out.append(Case("PNG-RGB-16-bit", pngs.raw_png(colour16, 16), COLOUR, None, LOSSLESS))
    out.append(
        Case(
            "PNG-RGBA-16-bit",
            pngs.raw_png(np.concatenate([colour16, alpha16[..., None]], -1), 16),
            COLOUR,
            ALPHA,
            LOSSLESS,
        )
    )
    ok, png = cv2.imencode(".png", np.ascontiguousarray(colour16[..., ::-1]))  # OpenCV: BGR
    assert ok
    out.append(Case("PNG-RGB-16-bit-opencv", png.tobytes(), COLOUR, None, LOSSLESS))

    def tiff(
        name: str, samples: np.ndarray, truth: np.ndarray, refused: str = "", **kw: object
    ) -> Case:
        buf = io.BytesIO()
        tifffile.imwrite(buf, samples, **kw)
        return Case(f"TIFF-{name}", buf.getvalue(), truth, None, LOSSLESS, refused)

    signed = np.rint((GREY - 0.5) * 65534).astype(np.int16)
    int8 = np.rint(GREY * 127).astype(np.int8)  # Pillow reads these as unsigned
    out += [
        tiff("int8", int8, grey3(int8 / 127)),
        # Layouts Pillow does not open: refused with the layout named.
        tiff("float64", GREY, grey3(GREY), "1 sample of 64-bit floating point"),
        tiff("float16", GREY.astype(np.float16), grey3(GREY), "16-bit floating point"),
        tiff(
            "int16-RGB",
            (COLOUR * 32767).astype(np.int16),
            COLOUR,
            "3 samples of 16-bit signed integer (RGB)",
            photometric="rgb",
        ),
        tiff(
            "uint16-grey+alpha",
            np.stack([grey16, alpha16], -1),
            grey3(GREY),
            "2 samples of 16-bit unsigned integer",
            photometric="minisblack",
            extrasamples=["unassalpha"],
        ),
        tiff("uint32", np.rint(GREY * (2**32 - 1)).astype(np.uint32), grey3(GREY)),
        tiff("int16", np.rint(GREY * 32767).astype(np.int16), grey3(GREY)),
        # negative samples are below black
        tiff("int16-negative", signed, grey3(np.clip(signed, 0, None) / 32767)),
        tiff("float32-0-255", (GREY * 255).astype(np.float32), grey3(GREY)),
        tiff("float32-minus1-1", (GREY * 2 - 1).astype(np.float32), grey3(GREY)),
        tiff("uint16-RGB", colour16, COLOUR, photometric="rgb"),
        tiff("uint16-min-is-white", 65535 - grey16, grey3(GREY), photometric="miniswhite"),
        tiff(
            "float32-min-is-white",
            (1 - GREY).astype(np.float32),
            grey3(GREY),
            photometric="miniswhite",
        ),
    ]
    return out


CASES = pillow_cases() + transparent_cases() + other_writer_cases()


def test_the_sweep_covers_every_mode_pillow_writes() -> None:
    """Guards the sweep itself: a case `saved` dropped, or a Pillow upgrade that stops
    writing a mode, shows here instead of quietly shrinking the sweep."""
    ids = {c.id for c in CASES}
    wanted = {f"TIFF-{mode}-raw" for mode in TiffImagePlugin.SAVE_INFO}
    wanted |= {f"JPEG-{mode}" for mode in JpegImagePlugin.RAWMODE}
    wanted |= {f"PNG-{mode}" for mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B")}
    wanted |= {"WEBP-RGB-lossless", "WEBP-RGBA-lossless", "WEBP-RGBA-webp-lossy", "GIF-P"}
    assert wanted <= ids, sorted(wanted - ids)
    assert {c.id for c in CASES if c.refused} >= {"TIFF-YCbCr-raw", "TIFF-float64"}


@pytest.fixture(scope="module")
def catalog(tiny_model_dir: Path) -> ModelCatalog:
    os.environ["U2NET_HOME"] = str(tiny_model_dir)
    return ModelCatalog.load(tiny_model_dir, ["tiny"], ["CPUExecutionProvider"], 1)


def blocks(plane: np.ndarray) -> np.ndarray:
    return plane.reshape(H // BLOCK, BLOCK, W // BLOCK, BLOCK).mean(axis=(1, 3))


def submission(data: bytes) -> jobs_pb2.JobSubmission:
    sub = jobs_pb2.JobSubmission()
    sub.image.content = data
    sub.operation.transform.format = jobs_pb2.OUTPUT_FORMAT_PNG
    return sub


def run(data: bytes, operation: jobs_pb2.Operation, catalog: ModelCatalog) -> np.ndarray:
    out = pipeline.run(operation, data, catalog, LIMITS.max_pixels, lambda s, p: None)
    img = Image.open(io.BytesIO(out.data))
    assert img.size == (W, H)
    return np.asarray(img.convert("RGBA"), dtype=np.float64) / 255


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_mode_comes_out_as_the_same_picture_or_is_refused_by_name(
    case: Case, catalog: ModelCatalog
) -> None:
    sub = submission(case.data)
    if case.refused:
        with pytest.raises(CutoutError) as refused:
            intake.validate(sub, "submission", LIMITS)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.violations[0].field == "submission.image.content"
        assert case.refused in refused.value.message, refused.value.message
        with pytest.raises(pipeline.InvalidImage, match=re.escape(case.refused)):  # node agrees
            run(case.data, sub.operation, catalog)
        return
    checked, pixels = intake.validate(sub, "submission", LIMITS)
    assert pixels == W * H

    out = run(case.data, checked.operation, catalog)
    for c, name in enumerate("RGB"):
        worst = np.abs(blocks(out[..., c]) - blocks(case.rgb[..., c])).max()
        assert worst <= case.tolerance, f"{name}: a block is off by {worst * 255:.1f}/255"
    if case.alpha is not None:
        worst = np.abs(blocks(out[..., 3]) - blocks(case.alpha)).max()
        assert worst <= case.tolerance, f"alpha: a block is off by {worst * 255:.1f}/255"

    cut = jobs_pb2.Operation()
    cut.remove_background.model = "tiny"
    alpha = run(case.data, cut, catalog)[..., 3]
    # The cutout's alpha is the input's alpha times the mask; fully transparent pixels say nothing.
    truth_alpha = case.alpha if case.alpha is not None else np.ones((H, W))
    mask = np.divide(alpha, truth_alpha, out=np.zeros_like(alpha), where=truth_alpha > 0)
    follows = np.corrcoef(blocks(mask).ravel(), blocks(case.rgb.mean(axis=-1)).ravel())[0, 1]
    assert follows > 0.9, f"the mask does not follow the picture (correlation {follows:.2f})"
