"""Each operation's output on real photos with the real IS-Net model (node functions, no network).

Remove background is compared with rembg.remove itself; face crops are
checked by finding the face again in the output; transforms by their sizes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from cutout.v1 import jobs_pb2
from services.inference import faces, pipeline
from services.inference.models import ModelCatalog
from tests.support.images import jpeg

MAX_PIXELS = 40_000_000


@pytest.fixture(scope="module")
def catalog(real_model_dir: Path) -> ModelCatalog:
    return ModelCatalog.load(real_model_dir, ["isnet-general-use"], ["CPUExecutionProvider"], 2)


def run(
    catalog: ModelCatalog, operation: jobs_pb2.Operation, data: bytes
) -> tuple[pipeline.Output, Image.Image, list[int]]:
    stages: list[int] = []
    out = pipeline.run(operation, data, catalog, MAX_PIXELS, lambda s, _: stages.append(s))
    return out, Image.open(io.BytesIO(out.data)), list(dict.fromkeys(stages))


def rembg(model_dir: Path, data: bytes, **kw: object) -> Image.Image:
    os.environ["U2NET_HOME"] = str(model_dir)
    from rembg import new_session, remove

    out = remove(data, session=new_session("isnet-general-use"), **kw)
    assert isinstance(out, bytes)
    return Image.open(io.BytesIO(out))


def crop_face(mode: int, fmt: int = jobs_pb2.OUTPUT_FORMAT_PNG) -> jobs_pb2.Operation:
    return jobs_pb2.Operation(crop_face=jobs_pb2.CropFace(mode=mode, format=fmt))


def centre_x(box: faces.Box) -> float:
    return box.x + box.w / 2


# --- face crops ----------------------------------------------------------------------------


def test_passport_photo_is_35x45mm_at_600dpi_head_in_range_centred_on_white(
    catalog: ModelCatalog,
) -> None:
    out, img, stages = run(
        catalog, crop_face(jobs_pb2.FACE_CROP_MODE_PASSPORT), jpeg(skimage.data.astronaut())
    )
    assert img.size == (827, 1063) == (out.width, out.height)
    assert stages == [
        jobs_pb2.STAGE_DECODING,
        jobs_pb2.STAGE_DETECTING,
        jobs_pb2.STAGE_INFERENCE,
        jobs_pb2.STAGE_COMPOSITING,
        jobs_pb2.STAGE_RESIZING,
        jobs_pb2.STAGE_ENCODING,
    ]
    pixels = np.asarray(img.convert("RGB"), dtype=np.int32)
    # Plain white background: the top corners and the band above the head.
    for patch in (pixels[:40, :40], pixels[:40, -40:], pixels[:60, :]):
        assert patch.min() >= 245, "background is not plain white"
    # The face, found again in the output, is centred and the head 32-36 mm tall.
    found = faces.detect(img)
    assert len(found) == 1
    face = found[0]
    assert abs(centre_x(face) - 827 / 2) <= 0.04 * 827
    non_white = np.nonzero((pixels[:, 300:527] < 200).any(axis=(1, 2)))[0]
    crown = int(non_white[0])
    _, chin = faces.head_span(face)
    low, high = faces.PASSPORT_HEAD_RANGE_PX
    assert low <= chin - crown <= high, f"head is {chin - crown:.0f} px, want {low:.0f}-{high:.0f}"
    # The result says where the face is, and it agrees with the detector.
    assert out.subject is not None
    x, _, w, h = out.subject
    assert abs((x + w / 2) - centre_x(face)) < 0.05 * w
    assert abs(h - face.h) < 0.15 * h


@pytest.mark.parametrize(
    ("mode", "aspect"),
    [(jobs_pb2.FACE_CROP_MODE_ID_CARD, 3 / 4), (jobs_pb2.FACE_CROP_MODE_SQUARE, 1.0)],
)
def test_id_card_and_square_frame_the_face_without_the_model(
    catalog: ModelCatalog, mode: int, aspect: float
) -> None:
    out, img, stages = run(catalog, crop_face(mode), jpeg(skimage.data.astronaut()))
    assert stages == [
        jobs_pb2.STAGE_DECODING,
        jobs_pb2.STAGE_DETECTING,
        jobs_pb2.STAGE_RESIZING,
        jobs_pb2.STAGE_ENCODING,
    ]
    assert abs(img.width / img.height - aspect) < 0.01
    assert out.subject is not None
    x, y, w, h = out.subject
    assert abs(x + w / 2 - img.width / 2) <= 2, "face not centred across"
    if mode == jobs_pb2.FACE_CROP_MODE_SQUARE:
        assert abs(y + h / 2 - img.height / 2) <= 2, "face not centred"
    # The photo's own pixels (no background removal) and the same face in them.
    found = faces.detect(img)
    assert len(found) == 1
    assert abs(centre_x(found[0]) - (x + w / 2)) < 0.1 * w


@pytest.mark.parametrize(
    ("photo", "words"),
    [
        (jpeg(skimage.data.chelsea()), "no face found"),  # a cat
        (jpeg(skimage.data.coffee()), "no face found"),
        (
            jpeg(np.concatenate([skimage.data.astronaut(), skimage.data.astronaut()], axis=1)),
            "2 faces found",
        ),
    ],
)
@pytest.mark.parametrize("mode", [jobs_pb2.FACE_CROP_MODE_PASSPORT, jobs_pb2.FACE_CROP_MODE_SQUARE])
def test_no_face_or_several_faces_is_a_clear_error_not_a_wrong_crop(
    catalog: ModelCatalog, photo: bytes, words: str, mode: int
) -> None:
    with pytest.raises(pipeline.InvalidImage, match=words):
        run(catalog, crop_face(mode), photo)


def test_a_face_too_small_for_600_dpi_is_refused(catalog: ModelCatalog) -> None:
    small = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((300, 300)))
    assert len(faces.detect(Image.fromarray(small))) == 1
    with pytest.raises(pipeline.InvalidImage, match="too small for a 600 dpi passport photo"):
        run(catalog, crop_face(jobs_pb2.FACE_CROP_MODE_PASSPORT), jpeg(small))


# --- remove background ----------------------------------------------------------------------


def test_crop_to_subject_keeps_rembg_alpha_and_reports_the_box(
    catalog: ModelCatalog, real_model_dir: Path
) -> None:
    data = jpeg(skimage.data.chelsea())
    spec = jobs_pb2.RemoveBackground(crop_to_subject=True, crop_margin_px=10)
    out, img, stages = run(catalog, jobs_pb2.Operation(remove_background=spec), data)
    assert stages == [
        jobs_pb2.STAGE_DECODING,
        jobs_pb2.STAGE_INFERENCE,
        jobs_pb2.STAGE_COMPOSITING,
        jobs_pb2.STAGE_ENCODING,
    ]
    reference = rembg(real_model_dir, data).getchannel("A")
    full = pipeline.subject_box(reference)
    assert full is not None
    fx, fy, fw, fh = full
    left, top = max(0, fx - 10), max(0, fy - 10)
    right, bottom = min(451, fx + fw + 10), min(300, fy + fh + 10)
    assert img.size == (right - left, bottom - top)
    expected = np.asarray(reference.crop((left, top, right, bottom)), dtype=np.float64)
    alpha = np.asarray(img.getchannel("A"), dtype=np.float64)
    assert np.abs(alpha - expected).mean() <= 2.0
    assert out.subject == pipeline.subject_box(img.getchannel("A"))
    assert out.subject is not None and out.subject[:2] == (fx - left, fy - top)


def test_alpha_matting_matches_rembg_with_the_same_settings(
    catalog: ModelCatalog, real_model_dir: Path
) -> None:
    data = jpeg(skimage.data.chelsea()[::2, ::2])
    spec = jobs_pb2.RemoveBackground(alpha_matting=True)
    _, img, _ = run(catalog, jobs_pb2.Operation(remove_background=spec), data)
    ours = np.asarray(img.getchannel("A"), dtype=np.float64)
    theirs = rembg(
        real_model_dir,
        data,
        alpha_matting=True,
        alpha_matting_foreground_threshold=240,
        alpha_matting_background_threshold=10,
        alpha_matting_erode_size=10,
    )
    assert np.abs(ours - np.asarray(theirs.getchannel("A"), dtype=np.float64)).mean() <= 2.0


def test_opaque_background_as_jpeg(catalog: ModelCatalog) -> None:
    spec = jobs_pb2.RemoveBackground(
        format=jobs_pb2.OUTPUT_FORMAT_JPEG,
        background_color=jobs_pb2.Color(red=0, green=0, blue=255, alpha=255),
    )
    out, img, _ = run(
        catalog, jobs_pb2.Operation(remove_background=spec), jpeg(skimage.data.coffee())
    )
    assert out.content_type == "image/jpeg" and img.format == "JPEG" and img.mode == "RGB"
    corner = np.asarray(img)[:20, :20].astype(np.int32)
    assert corner[..., 2].mean() > 200 and corner[..., :2].mean() < 60  # painted blue


# --- transforms (light jobs) -----------------------------------------------------------------


def transform(**kw: int) -> jobs_pb2.Operation:
    return jobs_pb2.Operation(transform=jobs_pb2.Transform(**kw))


@pytest.mark.parametrize(
    ("op", "size"),
    [
        (transform(resize=jobs_pb2.RESIZE_MODE_FIT, width_px=300), (300, 200)),
        (transform(resize=jobs_pb2.RESIZE_MODE_FIT, width_px=300, height_px=100), (150, 100)),
        (transform(resize=jobs_pb2.RESIZE_MODE_FIT, width_px=5000, height_px=5000), (600, 400)),
        (transform(resize=jobs_pb2.RESIZE_MODE_FILL, width_px=200, height_px=200), (200, 200)),
        (transform(resize=jobs_pb2.RESIZE_MODE_FILL, width_px=1200, height_px=100), (1200, 100)),
        (transform(), (600, 400)),
    ],
)
def test_transform_sizes(
    catalog: ModelCatalog, op: jobs_pb2.Operation, size: tuple[int, int]
) -> None:
    out, img, stages = run(catalog, op, jpeg(skimage.data.coffee()))
    assert img.size == size == (out.width, out.height)
    assert out.subject is None
    assert stages == [jobs_pb2.STAGE_DECODING, jobs_pb2.STAGE_RESIZING, jobs_pb2.STAGE_ENCODING]


def test_transform_converts_and_recompresses(catalog: ModelCatalog) -> None:
    rgba = Image.fromarray(skimage.data.astronaut()).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: JPEG has to flatten it onto white
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    small = transform(format=jobs_pb2.OUTPUT_FORMAT_JPEG, quality=20)
    large = transform(format=jobs_pb2.OUTPUT_FORMAT_JPEG, quality=95)
    low, img, _ = run(catalog, small, buf.getvalue())
    high, _, _ = run(catalog, large, buf.getvalue())
    assert img.format == "JPEG" and low.content_type == "image/jpeg"
    assert np.asarray(img).min() >= 250
    photo = jpeg(skimage.data.astronaut())
    low, _, _ = run(catalog, small, photo)
    high, _, _ = run(catalog, large, photo)
    assert len(low.data) < len(high.data) / 2
    lossless, webp, _ = run(catalog, transform(format=jobs_pb2.OUTPUT_FORMAT_WEBP), photo)
    assert webp.format == "WEBP" and lossless.content_type == "image/webp"
    assert np.array_equal(
        np.asarray(webp.convert("RGB")), np.asarray(Image.open(io.BytesIO(photo)))
    )
