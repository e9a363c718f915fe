"""Reading untrusted image bytes: the formats, the limits and the pixel modes, in one place.

The gateway's intake calls `inspect` (headers, and every PNG chunk, no pixels decoded);
the node's pipeline calls `decode` (the first frame as 8-bit RGB or RGBA). Both open the
bytes the same way, so an image intake accepts is one a node can read, and what intake
refuses a node would refuse with the same words.

Pillow's limits, set here for every process that reads images, and why:

- `Image.MAX_IMAGE_PIXELS = None`: `open_image` compares the header's dimensions with the
  service's own pixel limit before any pixel is decoded, and names them; Pillow's check
  would fire first (a warning from 89 MP, an error from 179 MP) with a vaguer message.
- `ImageFile.LOAD_TRUNCATED_IMAGES = False` (Pillow's default, pinned): with True, a
  truncated file decodes with its missing part grey, and a text chunk or ICC profile over
  the limits below is silently dropped; a cut-off upload must be refused, not half-cut out.
- `PngImagePlugin.MAX_TEXT_CHUNK` (1 MiB) and `MAX_TEXT_MEMORY` (64 MiB), Pillow's defaults,
  pinned: a compressed text chunk or ICC profile stops inflating at 1 MiB (a 200 MB zTXt
  bomb costs 1 MiB of inflating, then is refused) and all the text of one file at 64 MiB.
  Uncompressed text counts too and is already bounded by the upload size, so a lower total
  would only refuse photos with a large XMP packet and protect nothing.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import (
    Image,
    ImageFile,
    ImageOps,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
)

from services.common.errors import InvalidArgument

MiB = 1 << 20

Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False
PngImagePlugin.MAX_TEXT_CHUNK = 1 * MiB
PngImagePlugin.MAX_TEXT_MEMORY = 64 * MiB

# Leading bytes of each format, checked before Pillow sees the data; Pillow's own name.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAGIC: list[tuple[bytes, str]] = [
    (b"\xff\xd8\xff", "JPEG"),
    (PNG_SIGNATURE, "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
]
SUPPORTED = "JPEG, PNG, WebP, GIF, BMP or TIFF"

# Every mode Pillow opens these formats in, and so every mode `to_rgb` converts. "La"
# (premultiplied grey and alpha) is the one Pillow mode left out: no format here yields it
# and Pillow cannot convert it.
EIGHT_BIT = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)
WIDE = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})  # integer or float samples
CONVERTED = EIGHT_BIT | WIDE


class ImageError(InvalidArgument):
    """The bytes are not an image this service can read. The message describes the image
    without naming it ("is empty", "has mode La, ..."): callers prefix the field."""


@dataclass(frozen=True)
class Header:
    format: str
    mode: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in MAGIC:
        if data.startswith(magic):
            return fmt
    return None


def _why(exc: Exception) -> str:
    """Pillow's message, in words a sender can act on where Pillow's name a setting."""
    text = str(exc) or type(exc).__name__
    if "MAX_TEXT_CHUNK" in text:
        return (
            "a compressed text chunk or ICC profile inflates to more than "
            f"{PngImagePlugin.MAX_TEXT_CHUNK // MiB} MiB (a decompression bomb); "
            "strip the metadata and send it again"
        )
    if "MAX_TEXT_MEMORY" in text:
        return (
            f"its text chunks hold more than {PngImagePlugin.MAX_TEXT_MEMORY // MiB} MiB "
            "in all; strip the metadata and send it again"
        )
    return text


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image with its header read and checked; no pixel decoded yet.

    Raises ImageError for bytes that are not one of the formats, a header Pillow cannot
    read, impossible or too many pixels, or a mode this module does not convert.
    """
    if not data:
        raise ImageError("is empty; send the encoded image bytes")
    fmt = sniff(data)
    if fmt is None:
        raise ImageError(f"is not an image this service reads ({SUPPORTED})")
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])  # lazy: reads the header only
    except MemoryError:
        raise
    except Exception as exc:
        # Reading a header is a function of the bytes alone: whatever Pillow raises on
        # them (OSError, SyntaxError, ValueError over a limit, struct.error, ...) it raises
        # again on any machine, so it is a fact about this input, not a fault of ours.
        unknown = isinstance(exc, UnidentifiedImageError)
        layout = _tiff_layout(data) if unknown and fmt == "TIFF" else None
        if layout is not None:
            raise ImageError(layout) from None
        why = "Pillow cannot identify it" if unknown else _why(exc)
        raise ImageError(f"looks like {fmt} but its header is unreadable: {why}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"has impossible dimensions {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            f"is {width}x{height} ({width * height / 1e6:.1f} megapixels); "
            f"the limit is {max_pixels / 1e6:.1f}"
        )
    if img.mode not in CONVERTED:
        raise ImageError(
            f"has pixel mode {img.mode}, which this service does not convert to RGB; "
            "save it as 8-bit RGB or RGBA"
        )
    if _misread_ycbcr(img):
        raise ImageError(
            "is an uncompressed YCbCr TIFF, which Pillow cannot read; save it as RGB, or "
            "with LZW, Deflate or JPEG compression"
        )
    return img


SAMPLE_FORMATS = {1: "unsigned integer", 2: "signed integer", 3: "floating point"}
PHOTOMETRIC = {0: "WhiteIsZero", 1: "BlackIsZero", 2: "RGB", 3: "palette", 5: "CMYK", 6: "YCbCr"}


def _tiff_layout(data: bytes) -> str | None:
    """Why Pillow could not open a TIFF, from its first directory: the sample layout.

    Pillow opens a fixed table of layouts (TiffImagePlugin.OPEN_INFO); for any other it
    says only "cannot identify image file". None where the directory itself is unreadable.
    """
    try:
        ifd = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
        fp = io.BytesIO(data)
        fp.seek(ifd.next)
        ifd.load(fp)
        bits = ifd.get(TiffImagePlugin.BITSPERSAMPLE)
        count = _first(ifd.get(TiffImagePlugin.SAMPLESPERPIXEL), 1)
        kind = _first(ifd.get(TiffImagePlugin.SAMPLEFORMAT), 1)
        photometric = ifd.get(TiffImagePlugin.PHOTOMETRIC_INTERPRETATION)
    except Exception:  # a directory Pillow cannot parse either: its own message will do
        return None
    depths = sorted(set(bits)) if isinstance(bits, tuple) else [bits]
    depth = "/".join(str(d) for d in depths)
    colour = PHOTOMETRIC.get(photometric) if isinstance(photometric, int) else None
    return (
        f"is a TIFF whose pixels are {count} sample{'s' if count > 1 else ''} of {depth}-bit "
        f"{SAMPLE_FORMATS.get(kind, f'sample format {kind}')} "
        f"({colour or f'photometric {photometric}'}), a layout Pillow does not read; "
        "save it as 8-bit RGB or RGBA, or 16-bit grey"
    )


def _misread_ycbcr(img: Image.Image) -> bool:
    # Pillow unpacks uncompressed 3-sample YCbCr strips as 4-sample RGBX (so it reads past
    # each strip); compressed ones go through libtiff, which converts them right.
    return (
        isinstance(img, TiffImagePlugin.TiffImageFile)
        and img.tag_v2.get(TiffImagePlugin.PHOTOMETRIC_INTERPRETATION) == 6
        and any(tile.codec_name == "raw" for tile in img.tile)
    )


def inspect(data: bytes, max_pixels: int) -> Header:
    """What intake needs: the header checked as `open_image` does, and for a PNG every
    chunk after the image data read too (as decoding will), without inflating any pixel.

    Other formats keep nothing compressed outside their pixels, which are bounded by the
    pixel limit; decoding them here would cost the gateway what a node is for (tens to
    hundreds of ms and up to 4 bytes per pixel for a large photo).
    """
    img = open_image(data, max_pixels)
    if img.format == "PNG":
        try:
            _read_png_chunks(data)
        except MemoryError:
            raise
        except ImageError:
            raise
        except Exception as exc:  # as in open_image: a fact about the bytes
            raise ImageError(f"is a PNG with an unreadable chunk: {_why(exc)}") from None
    return Header(str(img.format), img.mode, img.width, img.height)


def _read_png_chunks(data: bytes) -> None:
    """Pass every chunk but the pixel data through Pillow's own chunk handlers, with the
    text limits above, the way Image.load() passes the ones after the image data.

    Mirrors PngImageFile.load_end: a broken chunk header after the image data ends the
    reading (Pillow tolerates it), an undecodable text ends it too, unknown chunk types are
    skipped. A chunk that runs past the end of the file is refused: decoding would fail on it.
    """
    fp = io.BytesIO(data)
    stream = PngImagePlugin.PngStream(fp)
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        fp.seek(pos)
        try:
            cid, start, length = stream.read()
        except (struct.error, SyntaxError):
            return
        if cid == b"IEND":
            return
        end = start + length + 4  # the data and its CRC
        if end > len(data):
            name = cid.decode("latin-1")
            raise ImageError(
                f"is truncated: its {name} chunk at byte {pos} needs {length} bytes of "
                f"data, the file ends {len(data) - start} bytes later"
            )
        if cid != b"IDAT":  # pixels: never inflated here
            try:
                stream.call(cid, start, length)
            except (EOFError, AttributeError):
                pass  # end of an fdAT frame's header; a chunk type Pillow skips
            except UnicodeDecodeError:
                return
        pos = end


@dataclass(frozen=True)
class Samples:
    """How the integer or float samples of an I, I;16 or F image map to 0-1.

    Attributes:
        white: the sample value that is white (the type's largest, from TIFF's tags where
            the file says; PNG and Pillow's I;16 are 16-bit).
        unsigned32: stored as unsigned 32-bit, which Pillow holds as signed (so the top half
            reads negative) until reinterpreted.
        inverted: TIFF's WhiteIsZero, which Pillow inverts for 8-bit samples but not wider.
        signed8: signed 8-bit TIFF samples, which Pillow reads as unsigned (mode L, so -1
            is white); reinterpreted and mapped like wider signed samples.
    """

    white: float = 65535.0
    unsigned32: bool = False
    inverted: bool = False
    signed8: bool = False

    @classmethod
    def of(cls, img: Image.Image) -> Samples:
        bits, signed = (16, False) if img.mode.startswith("I;16") else (32, True)
        if not isinstance(img, TiffImagePlugin.TiffImageFile):
            return cls(white=float(2 ** (bits - 1) - 1 if signed else 2**bits - 1))
        tags = img.tag_v2
        bits = _first(tags.get(TiffImagePlugin.BITSPERSAMPLE), bits)
        sample_format = _first(tags.get(TiffImagePlugin.SAMPLEFORMAT), 1)
        signed = sample_format == 2
        return cls(
            white=float(2 ** (bits - 1) - 1 if signed else 2**bits - 1),
            unsigned32=img.mode == "I" and bits == 32 and sample_format == 1,
            inverted=img.mode in WIDE and tags.get(TiffImagePlugin.PHOTOMETRIC_INTERPRETATION) == 0,
            signed8=img.mode == "L" and bits == 8 and signed,
        )


def _first(value: object, default: int) -> int:
    if isinstance(value, tuple) and value:
        value = value[0]
    return value if isinstance(value, int) and value > 0 else default


ROWS_AT_ONCE = 1 << 20  # samples per float32 block: 4 MB of scratch, whatever the image size


def _to_unit_rows(arr: np.ndarray, unit: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """8-bit samples of `unit(block)` (values 0-1), a block of rows at a time."""
    out = np.empty(arr.shape, np.uint8)
    step = max(1, ROWS_AT_ONCE // max(arr.shape[1], 1))
    for top in range(0, arr.shape[0], step):
        block = unit(arr[top : top + step].astype(np.float32))
        out[top : top + step] = np.rint(np.clip(block, 0.0, 1.0) * 255)
    return out


def _float_range(arr: np.ndarray) -> tuple[float, float]:
    """Where 0 and 1 are in a float image's samples.

    A float image carries no white point. The tools that write float photos use 0-1, so
    that is the range when every sample lies in it; otherwise the samples are stretched
    from min(0, lowest) to the highest, which keeps the picture (the mask models scale
    their input by its maximum anyway). NaN and infinities are left out of the range.
    """
    lo, hi = np.inf, -np.inf
    step = max(1, ROWS_AT_ONCE // max(arr.shape[1], 1))
    for top in range(0, arr.shape[0], step):
        block = arr[top : top + step]
        finite = block[np.isfinite(block)]
        if finite.size:
            lo, hi = min(lo, float(finite.min())), max(hi, float(finite.max()))
    if lo > hi:  # nothing finite
        return 0.0, 1.0
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    lo = min(lo, 0.0)
    return lo, max(hi, lo + 1e-12)


def _wide_to_grey(img: Image.Image, samples: Samples) -> np.ndarray:
    arr = np.asarray(img)
    if img.mode == "F":
        lo, hi = _float_range(arr)

        def unit(block: np.ndarray) -> np.ndarray:
            return np.nan_to_num((block - lo) / (hi - lo), nan=0.0, posinf=1.0, neginf=0.0)

    else:
        if samples.unsigned32:
            arr = arr.view(np.uint32)
        elif samples.signed8:
            arr = arr.view(np.int8)
        white = samples.white

        def unit(block: np.ndarray) -> np.ndarray:
            return block / white  # negative (signed) samples clip to black

    grey = _to_unit_rows(arr, unit)
    return 255 - grey if samples.inverted else grey


def to_rgb(img: Image.Image, samples: Samples) -> Image.Image:
    """8-bit RGB, or RGBA where the image has alpha or a transparent colour."""
    transparency = img.info.get("transparency")
    has_alpha = any(band in ("A", "a") for band in img.getbands()) or transparency is not None
    if img.mode in WIDE or samples.signed8:
        grey = _wide_to_grey(img, samples)
        out = Image.fromarray(grey).convert("RGB")
        if isinstance(transparency, int) and img.mode != "F":  # PNG's tRNS of 16-bit grey
            keyed = np.asarray(img) != transparency
            out.putalpha(Image.fromarray(np.where(keyed, 255, 0).astype(np.uint8)))
        return out
    if img.mode in ("RGB", "RGBA") and transparency is None:
        return img
    return img.convert("RGBA" if has_alpha else "RGB")


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """The first frame, upright per its EXIF orientation, as 8-bit RGB or RGBA.

    Raises ImageError for anything `open_image` refuses and for pixel data that does not
    decode (truncated, corrupt, a text bomb after the image data, ...).
    """
    img = open_image(data, max_pixels)
    try:
        img.seek(0)
        img.load()
        samples = Samples.of(img)  # from the file's tags: before transposing drops them
        upright = ImageOps.exif_transpose(img)
        return to_rgb(upright, samples)
    except MemoryError:
        raise
    except Exception as exc:  # as in open_image: decoding is a function of the bytes alone
        raise ImageError(f"cannot be decoded: {_why(exc)}") from None
