"""The image work of one job, as plain functions (no gRPC, no asyncio).

For background removal these are rembg.remove's steps split into stages so
progress can be reported between them; the mask comes from the model's
session (services/inference/masking.py for IS-Net/U2Net and custom files,
rembg's own session otherwise), so the output stays within 2/255 of what
rembg.remove gives. Face crops use services/inference/faces.py; transforms
(light jobs) need no model at all.

Stages each operation reports, in order (docs/architecture.md lists them):
  remove_background  DECODING, INFERENCE, COMPOSITING, ENCODING
  crop_face passport DECODING, DETECTING, INFERENCE, COMPOSITING, RESIZING, ENCODING
  crop_face id/square DECODING, DETECTING, RESIZING, ENCODING
  transform          DECODING, RESIZING, ENCODING
"""

from __future__ import annotations

import hashlib
import io
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from cutout.v1 import jobs_pb2
from services.common import images
from services.common.errors import FailedPrecondition, InvalidArgument
from services.inference import faces, matting
from services.inference.models import ModelCatalog

Report = Callable[[int, int], None]  # (Stage, percent)

CONTENT_TYPES: dict[int, str] = {
    jobs_pb2.OUTPUT_FORMAT_WEBP: "image/webp",
    jobs_pb2.OUTPUT_FORMAT_JPEG: "image/jpeg",
}
DEFAULT_QUALITY = 85
# Largest photo matted (its matte is solved on at most matting.WORK_PIXELS of it).
MAX_MATTING_PIXELS = 8_000_000
MAX_MARGIN_PX = 1000
# Largest side each output format's encoder takes (libwebp's and libjpeg's limits).
MAX_SIDE: dict[int, tuple[str, int]] = {
    jobs_pb2.OUTPUT_FORMAT_WEBP: ("WebP", 16383),
    jobs_pb2.OUTPUT_FORMAT_JPEG: ("JPEG", 65500),
}
# Where the image is in the job as its sender built it; the node sees only the bytes.
IMAGE_FIELD = "submission.image.content"


class InvalidImage(InvalidArgument):
    """The input cannot be processed by any attempt: the job fails, never retried."""


class Unsupported(FailedPrecondition):
    """The operation (or its model) is not available on this node: the job fails."""


@dataclass(frozen=True)
class Output:
    data: bytes
    content_type: str
    width: int
    height: int
    subject: tuple[int, int, int, int] | None = None  # x, y, width, height in the output

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """The first frame, upright, as 8-bit RGB(A); InvalidImage for anything unreadable.

    The same reading as the gateway's intake (services/common/images.py), so the words of
    a refusal here match the ones intake would have used.
    """
    try:
        return images.decode(data, max_pixels)
    except images.ImageError as exc:
        why = str(exc)
    # Not chained to the ImageError: its traceback would keep what Pillow read alive for
    # as long as the job's error is referenced (see services/gateway/intake.py).
    raise InvalidImage(f"{IMAGE_FIELD} {why}")


def _opaque(img: Image.Image) -> Image.Image:
    if img.mode in ("RGB", "L"):
        return img
    flat = Image.new("RGB", img.size, faces.WHITE)
    flat.paste(img, mask=img.getchannel("A") if "A" in img.getbands() else None)
    return flat


def _grey(img: Image.Image) -> bool:
    """Grey content: one channel, or R = G = B on a sparse grid of pixels (microseconds)."""
    if img.mode in ("L", "LA", "1", "I", "F", "I;16"):
        return True
    px = np.asarray(img)[::17, ::17]
    return bool((px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all())


def encode(
    img: Image.Image,
    fmt: int,
    quality: int = 0,
    subject: tuple[int, int, int, int] | None = None,
) -> Output:
    name, side = MAX_SIDE.get(fmt, ("PNG", 2**31 - 1))
    if max(img.size) > side:
        # Known before encoding; the encoder's own error would read as a fault of the node.
        raise InvalidImage(
            f"the output is {img.width}x{img.height} and {name} holds at most {side} pixels "
            "a side; ask for PNG output, or resize"
        )
    buf = io.BytesIO()
    if fmt == jobs_pb2.OUTPUT_FORMAT_WEBP:
        if quality:
            img.save(buf, "WEBP", quality=quality, method=4)
        else:
            img.save(buf, "WEBP", lossless=True, quality=80, method=2)
    elif fmt == jobs_pb2.OUTPUT_FORMAT_JPEG:
        # JPEG has no alpha: transparent parts become white.
        _opaque(img).save(buf, "JPEG", quality=quality or DEFAULT_QUALITY, optimize=True)
    else:
        # zlib's RLE strategy on colour photos: 12 MP in 1.38 s of CPU instead of 1.82 s,
        # and smaller files (skimage's astronaut, chelsea, coffee, rocket: 6-13% smaller).
        # Grey content (R = G = B) loses 47% with it (camera: 408 against 278 kB), so grey
        # images keep the default strategy.
        strategy = zlib.Z_DEFAULT_STRATEGY if _grey(img) else zlib.Z_RLE
        img.save(buf, "PNG", compress_level=3, compress_type=strategy)
    content_type = CONTENT_TYPES.get(fmt, "image/png")
    return Output(buf.getvalue(), content_type, img.width, img.height, subject)


def _mask(img: Image.Image, model_name: str, catalog: ModelCatalog) -> Image.Image:
    model = catalog.get(model_name)
    if model is None:
        raise Unsupported(
            f"model {model_name!r} is not loaded here; loaded: {sorted(catalog.models)}"
        )
    mask: Image.Image = model.session.predict(img)[0]
    return mask


def naive_cutout(img: Image.Image, mask: Image.Image) -> Image.Image:
    """rembg's naive_cutout, the same pixels (colour scaled by alpha) at 40% of its CPU.

    rembg's Image.composite(img, transparent, mask) is this paste done on a
    copy of the transparent image, so the bytes are identical; at 12 MP it
    measured 227 ms of CPU against 89 ms for this.
    """
    out = Image.new("RGBA", img.size, 0)
    out.paste(img, mask=mask)
    return out


_HALF_OPAQUE = [0] * 128 + [255] * 128


def subject_box(alpha: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box (x, y, w, h) of the pixels at least half opaque; None when there are none.

    In PIL (a lookup table, then getbbox): 21 ms at 12 MP against 40 ms in numpy.
    """
    box = alpha.convert("L").point(_HALF_OPAQUE).getbbox()
    if box is None:
        return None
    left, top, right, bottom = box
    return left, top, right - left, bottom - top


def remove_background(
    img: Image.Image, spec: jobs_pb2.RemoveBackground, catalog: ModelCatalog, report: Report
) -> tuple[Image.Image, tuple[int, int, int, int] | None]:
    from rembg.bg import apply_background_color

    if spec.alpha_matting and img.width * img.height > MAX_MATTING_PIXELS:
        raise InvalidImage(
            f"alpha matting is limited to {MAX_MATTING_PIXELS / 1e6:.0f} megapixels; this image "
            f"has {img.width * img.height / 1e6:.1f}: resize it first or turn alpha_matting off"
        )
    report(jobs_pb2.STAGE_INFERENCE, 20)
    mask = _mask(img, spec.model, catalog)
    report(jobs_pb2.STAGE_COMPOSITING, 75)
    out: Image.Image
    if spec.mask_only:
        out = mask
    elif spec.alpha_matting:
        out = matting.cutout(img, mask)
    else:
        out = naive_cutout(img, mask)
    box = subject_box(out.getchannel("A") if out.mode == "RGBA" else out)
    if spec.crop_to_subject and box is not None:
        m = min(max(spec.crop_margin_px, 0), MAX_MARGIN_PX)
        x, y, w, h = box
        left, top = max(0, x - m), max(0, y - m)
        out = out.crop((left, top, min(out.width, x + w + m), min(out.height, y + h + m)))
        box = (x - left, y - top, w, h)
    if not spec.mask_only and spec.HasField("background_color"):
        c = spec.background_color
        out = apply_background_color(out, (c.red, c.green, c.blue, c.alpha))
    return out, box


def crop_face(
    img: Image.Image, spec: jobs_pb2.CropFace, catalog: ModelCatalog, report: Report
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    report(jobs_pb2.STAGE_DETECTING, 10)
    try:
        face = faces.single_face(img)
        if spec.mode == jobs_pb2.FACE_CROP_MODE_PASSPORT:
            report(jobs_pb2.STAGE_INFERENCE, 20)
            mask = _mask(img, "", catalog)
            report(jobs_pb2.STAGE_COMPOSITING, 70)
            frame = faces.passport_frame(face, faces.crown_from_mask(face, np.asarray(mask)))
            source = Image.new("RGB", img.size, faces.WHITE)
            source.paste(img.convert("RGB"), mask=mask)
        else:
            aspect = 3 / 4 if spec.mode == jobs_pb2.FACE_CROP_MODE_ID_CARD else 1.0
            frame = faces.portrait_frame(face, img.size, aspect)
            source = img
    except faces.FaceError as exc:
        raise InvalidImage(str(exc)) from exc
    report(jobs_pb2.STAGE_RESIZING, 80)
    placed = face.scaled(frame.scale, frame.dx, frame.dy)
    box = (round(placed.x), round(placed.y), round(placed.w), round(placed.h))
    return frame.apply(source), box


def transform(img: Image.Image, spec: jobs_pb2.Transform, report: Report) -> Image.Image:
    report(jobs_pb2.STAGE_RESIZING, 30)
    if spec.resize == jobs_pb2.RESIZE_MODE_FIT:
        width = spec.width_px or img.width
        height = spec.height_px or img.height
        if img.width > width or img.height > height:
            img = ImageOps.contain(img, (width, height), Image.Resampling.LANCZOS)
    elif spec.resize == jobs_pb2.RESIZE_MODE_FILL:
        img = ImageOps.fit(img, (spec.width_px, spec.height_px), Image.Resampling.LANCZOS)
    return img


def run(
    operation: jobs_pb2.Operation,
    data: bytes,
    catalog: ModelCatalog,
    max_pixels: int,
    report: Report,
) -> Output:
    """Run one job attempt start to finish; report progress as it goes."""
    kind = operation.WhichOneof("kind")
    if kind not in ("remove_background", "crop_face", "transform"):
        raise Unsupported(f"operation {kind or 'none'!r} is not supported by this node")
    report(jobs_pb2.STAGE_DECODING, 5)
    img = decode(data, max_pixels)
    if kind == "remove_background":
        spec = operation.remove_background
        out, box = remove_background(img, spec, catalog, report)
        fmt, quality = spec.format, 0
    elif kind == "crop_face":
        out, box = crop_face(img, operation.crop_face, catalog, report)
        fmt, quality = operation.crop_face.format, 0
    else:
        out, box = transform(img, operation.transform, report), None
        fmt, quality = operation.transform.format, operation.transform.quality
    report(jobs_pb2.STAGE_ENCODING, 85)
    output = encode(out, fmt, quality, box)
    report(jobs_pb2.STAGE_ENCODING, 90)
    return output
