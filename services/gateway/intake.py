"""Checks a submission before it costs the fleet anything.

Formats are sniffed from the bytes, never from a name; sizes and modes come from the
header, and a PNG's chunks are all read (services/common/images.py says how and why),
before any pixel is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

from cutout.v1 import jobs_pb2
from services.common import images
from services.common.errors import CutoutError, FieldViolation, InvalidArgument
from services.common.identity import ID_RULE, VENDOR_ID
from services.common.operations import PRIORITIES, PRIORITY_RULE

RECORD_ID = VENDOR_ID  # project and record ids follow the vendor id's rule


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int
    max_pixels: int
    models: tuple[str, ...]  # the first is the default


def image_size(data: bytes, field: str, limits: Limits) -> int:
    """Pixels in the image per its header; a CutoutError if it is not an acceptable image."""
    if len(data) > limits.max_image_bytes:
        raise _bad(field, f"is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    try:
        return images.inspect(data, limits.max_pixels).pixels
    except images.ImageError as exc:
        why = str(exc)
    # Raised here, not in the except clause, so that nothing chains to the ImageError: its
    # traceback holds Pillow's frames and all they read (up to 64 MiB of PNG text), and a
    # gRPC handler's error lives until the cyclic GC runs (the gateway grew 200 MB over
    # tests/cluster/test_bad_inputs.py's corpus while it did).
    raise _bad(field, why)


def _bad(field: str, description: str) -> InvalidArgument:
    return InvalidArgument(
        f"{field} {description}", violations=[FieldViolation(field, description)]
    )


MAX_BOX_PX = 10_000
MAX_MARGIN_PX = 1000


def _check_format(fmt: int, field: str) -> list[FieldViolation]:
    if fmt not in jobs_pb2.OutputFormat.values():
        return [FieldViolation(field, "unknown output format; use PNG, WEBP or JPEG")]
    return []


def _check_remove_background(
    spec: jobs_pb2.RemoveBackground, prefix: str, limits: Limits
) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    if spec.model and spec.model not in limits.models:
        out.append(
            FieldViolation(
                f"{prefix}.model",
                f"unknown model {spec.model[:64]!r}; available: {', '.join(limits.models)}",
            )
        )
    out += _check_format(spec.format, f"{prefix}.format")
    opaque = spec.HasField("background_color") and spec.background_color.alpha == 255
    if spec.format == jobs_pb2.OUTPUT_FORMAT_JPEG and not (spec.mask_only or opaque):
        out.append(
            FieldViolation(
                f"{prefix}.format",
                "JPEG has no transparency: use PNG or WEBP, or set mask_only or an opaque "
                "background_color",
            )
        )
    if spec.HasField("background_color"):
        c = spec.background_color
        if max(c.red, c.green, c.blue, c.alpha) > 255:
            out.append(FieldViolation(f"{prefix}.background_color", "components must be 0-255"))
    if not 0 <= spec.crop_margin_px <= MAX_MARGIN_PX:
        out.append(FieldViolation(f"{prefix}.crop_margin_px", f"must be 0-{MAX_MARGIN_PX}"))
    elif spec.crop_margin_px and not spec.crop_to_subject:
        out.append(FieldViolation(f"{prefix}.crop_margin_px", "needs crop_to_subject"))
    return out


def _check_crop_face(spec: jobs_pb2.CropFace, prefix: str) -> list[FieldViolation]:
    out = _check_format(spec.format, f"{prefix}.format")
    modes = "PASSPORT, ID_CARD or SQUARE"
    if spec.mode == jobs_pb2.FACE_CROP_MODE_UNSPECIFIED:
        out.append(FieldViolation(f"{prefix}.mode", f"required: {modes}"))
    elif spec.mode not in jobs_pb2.FaceCropMode.values():
        out.append(FieldViolation(f"{prefix}.mode", f"unknown mode; use {modes}"))
    return out


def _check_transform(spec: jobs_pb2.Transform, prefix: str) -> list[FieldViolation]:
    out = _check_format(spec.format, f"{prefix}.format")
    for name in ("width_px", "height_px"):
        if not 0 <= getattr(spec, name) <= MAX_BOX_PX:
            out.append(FieldViolation(f"{prefix}.{name}", f"must be 0-{MAX_BOX_PX}"))
    if spec.resize not in jobs_pb2.ResizeMode.values():
        out.append(FieldViolation(f"{prefix}.resize", "unknown mode; use FIT or FILL"))
    elif spec.resize == jobs_pb2.RESIZE_MODE_FILL and not (spec.width_px and spec.height_px):
        out.append(FieldViolation(f"{prefix}.resize", "FILL needs both width_px and height_px"))
    elif spec.resize == jobs_pb2.RESIZE_MODE_FIT and not (spec.width_px or spec.height_px):
        out.append(FieldViolation(f"{prefix}.resize", "FIT needs width_px or height_px"))
    if not 0 <= spec.quality <= 100:
        out.append(FieldViolation(f"{prefix}.quality", "must be 1-100, or 0 for the default"))
    return out


def _check_operation(op: jobs_pb2.Operation, prefix: str, limits: Limits) -> list[FieldViolation]:
    kind = op.WhichOneof("kind")
    if kind is None:
        return [FieldViolation(prefix, "required: remove_background, crop_face or transform")]
    if kind == "crop_face":
        return _check_crop_face(op.crop_face, f"{prefix}.crop_face")
    if kind == "transform":
        return _check_transform(op.transform, f"{prefix}.transform")
    return _check_remove_background(op.remove_background, f"{prefix}.remove_background", limits)


def validate(
    sub: jobs_pb2.JobSubmission, prefix: str, limits: Limits
) -> tuple[jobs_pb2.JobSubmission, int]:
    """Return the submission with defaults filled in, and its pixel count.

    Raises CutoutError listing every field that is wrong, each by its path.
    """
    violations = _check_operation(sub.operation, f"{prefix}.operation", limits)
    if sub.priority not in PRIORITIES:
        violations.append(FieldViolation(f"{prefix}.priority", PRIORITY_RULE))
    if (
        len(sub.client_key) > 128
        or not sub.client_key.isprintable()
        or not sub.client_key.isascii()
    ):
        violations.append(
            FieldViolation(f"{prefix}.client_key", "at most 128 printable ASCII characters")
        )
    if sub.HasField("record"):
        for name in ("project_id", "record_id"):
            if not RECORD_ID.match(getattr(sub.record, name)):
                violations.append(FieldViolation(f"{prefix}.record.{name}", ID_RULE))
    source = sub.image.WhichOneof("source")
    if source is None:
        violations.append(FieldViolation(f"{prefix}.image", "required: content (bytes) or uri"))
    elif source == "uri":
        # The gateway fetches URLs (services/common/fetch.py) before validating.
        raise CutoutError(f"{prefix}.image.uri: not fetched")  # INTERNAL: a bug
    if violations:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise InvalidArgument(summary, violations=violations)
    pixels = image_size(sub.image.content, f"{prefix}.image.content", limits)
    out = jobs_pb2.JobSubmission()
    out.CopyFrom(sub)
    if out.operation.HasField("remove_background") and not out.operation.remove_background.model:
        out.operation.remove_background.model = limits.models[0]
    return out, pixels
