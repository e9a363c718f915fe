"""The image work of one job, as plain functions (no gRPC, no asyncio).

For background removal these are rembg.remove's steps split into stages so
progress can be reported between them; the mask comes from the model's
session (services/inference/masking.py for IS-Net/U2Net and custom files,
rembg's own session otherwise), so the output stays within 2/255 of what
rembg.remove gives.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from cutout.v1 import jobs_pb2
from services.inference.models import ModelCatalog

Report = Callable[[int, int], None]  # (Stage, percent)

CONTENT_TYPES: dict[int, str] = {jobs_pb2.OUTPUT_FORMAT_WEBP: "image/webp"}


class InvalidImage(ValueError):
    """The input cannot be processed by any attempt: do not retry."""


class Unsupported(ValueError):
    """The operation is not available on this node."""


@dataclass(frozen=True)
class Output:
    data: bytes
    content_type: str
    width: int
    height: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Open the first frame, refuse oversized images before decoding, honour EXIF."""
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise InvalidImage(
                f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
                f"the limit is {max_pixels / 1e6:.1f}"
            )
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImage(f"cannot decode image: {exc}") from exc
    if img.mode not in ("RGB", "RGBA"):
        # rembg's compositing expects RGB(A); palette, grey, CMYK and 16-bit inputs convert here.
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
    return img


def encode(img: Image.Image, fmt: int) -> Output:
    buf = io.BytesIO()
    if fmt == jobs_pb2.OUTPUT_FORMAT_WEBP:
        img.save(buf, "WEBP", lossless=True, quality=80, method=2)
    else:
        img.save(buf, "PNG", compress_level=3)
    return Output(buf.getvalue(), CONTENT_TYPES.get(fmt, "image/png"), img.width, img.height)


def remove_background(
    img: Image.Image, spec: jobs_pb2.RemoveBackground, catalog: ModelCatalog, report: Report
) -> Image.Image:
    from rembg.bg import apply_background_color, naive_cutout

    model = catalog.get(spec.model)
    if model is None:
        raise Unsupported(
            f"model {spec.model!r} is not loaded here; loaded: {sorted(catalog.models)}"
        )
    report(jobs_pb2.STAGE_INFERENCE, 20)
    mask: Image.Image = model.session.predict(img)[0]
    report(jobs_pb2.STAGE_COMPOSITING, 75)
    if spec.mask_only:
        return mask
    cutout: Image.Image = naive_cutout(img, mask)
    if spec.HasField("background_color"):
        c = spec.background_color
        cutout = apply_background_color(cutout, (c.red, c.green, c.blue, c.alpha))
    return cutout


def run(
    operation: jobs_pb2.Operation,
    data: bytes,
    catalog: ModelCatalog,
    max_pixels: int,
    report: Report,
) -> Output:
    """Run one job attempt start to finish; report progress as it goes."""
    kind = operation.WhichOneof("kind")
    if kind != "remove_background":
        raise Unsupported(f"operation {kind or 'none'!r} is not supported by this node")
    report(jobs_pb2.STAGE_DECODING, 5)
    img = decode(data, max_pixels)
    spec = operation.remove_background
    out = remove_background(img, spec, catalog, report)
    report(jobs_pb2.STAGE_ENCODING, 85)
    output = encode(out, spec.format)
    report(jobs_pb2.STAGE_ENCODING, 90)
    return output
