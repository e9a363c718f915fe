"""Face detection and the framing of passport, ID-card and square crops.

The detector is OpenCV's Viola-Jones cascade `haarcascade_frontalface_alt2`,
which ships inside the `opencv-python-headless` 4.x wheel (nothing downloaded at
run time, no GPU, a few milliseconds per photo). Passport and ID photos are
frontal by rule, which is exactly what this cascade finds; a profile or a
tilted head is reported as "no face" rather than cropped wrongly. Of the
frontal cascades OpenCV ships, alt2 is the one without false positives on
the test photos at every scale from 200 to 1600 px (the "default" cascade
finds a second face in the astronaut's hair at 300 px and one in the cat at
1024 px).

Geometry is pure functions of the detected box so it can be tested without
images. Measured on frontal portraits, the cascade's box spans from the
mid-forehead to just above the chin: the chin lies about 0.18 box heights
below it and the crown (top of the hair) about 0.5 box heights above it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from services.common.errors import InvalidArgument

# Passport: 35x45 mm at 600 dpi, head (crown to chin) 32-36 mm, aim for 34.
DPI = 600
PASSPORT_SIZE = (round(35 / 25.4 * DPI), round(45 / 25.4 * DPI))  # 827 x 1063
PASSPORT_HEAD_PX = round(34 / 25.4 * DPI)  # 803
PASSPORT_HEAD_RANGE_PX = (32 / 25.4 * DPI, 36 / 25.4 * DPI)
MAX_UPSCALE = 8.0  # a head under ~100 px cannot make a 600 dpi photo
CHIN_BELOW = 0.18  # box heights below the box's bottom edge
CROWN_ABOVE = 0.5  # box heights above the box's top edge (without a mask)
DETECT_MAX_SIDE = 1024  # detection runs on a copy at most this large
MIN_FACE_FRACTION = 0.08  # faces smaller than this share of the short side are ignored
WHITE = (255, 255, 255)


class FaceError(InvalidArgument):
    """No face, several faces, or a face that cannot be framed: a per-job error (the
    pipeline reports it as an InvalidImage)."""


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2

    def scaled(self, s: float, dx: float, dy: float) -> Box:
        return Box(self.x * s + dx, self.y * s + dy, self.w * s, self.h * s)


@dataclass(frozen=True)
class Frame:
    """Where the output comes from: output = input * scale + (dx, dy)."""

    size: tuple[int, int]
    scale: float
    dx: float
    dy: float

    def apply(self, img: Image.Image) -> Image.Image:
        s = self.scale
        data = (1 / s, 0.0, -self.dx / s, 0.0, 1 / s, -self.dy / s)
        resample = Image.Resampling.BICUBIC if s != 1 else Image.Resampling.NEAREST
        return img.transform(
            self.size, Image.Transform.AFFINE, data, resample=resample, fillcolor=WHITE
        )


_local = threading.local()
_importing = threading.Lock()


def _cv2() -> Any:
    """OpenCV, imported by one thread at a time.

    cv2's package bootstrap is not safe to run from two threads at once: a second
    job's thread saw a half-initialised module ("module 'cv2' has no attribute
    'data'") when two face crops were the node's first.
    """
    with _importing:
        import cv2
        import cv2.data

    return cv2


def _cascade() -> object:
    # CascadeClassifier is not safe to share between threads: one per thread.
    cascade = getattr(_local, "cascade", None)
    if cascade is None:
        cv2 = _cv2()
        folder: str = cv2.data.haarcascades
        path = os.path.join(folder, "haarcascade_frontalface_alt2.xml")
        cascade = cv2.CascadeClassifier(path)
        if cascade.empty():
            raise RuntimeError(f"cannot load the face detector from {path}")
        _local.cascade = cascade
    return cascade


def detect(img: Image.Image) -> list[Box]:
    """Frontal faces in the image, in its own pixel coordinates."""
    cv2 = _cv2()
    grey = img.convert("L")
    shrink = min(1.0, DETECT_MAX_SIDE / max(grey.size))
    if shrink < 1.0:
        size = (max(1, round(grey.width * shrink)), max(1, round(grey.height * shrink)))
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    pixels = cv2.equalizeHist(np.asarray(grey))
    least = max(24, int(min(pixels.shape) * MIN_FACE_FRACTION))
    found = _cascade().detectMultiScale(  # type: ignore[attr-defined]
        pixels, scaleFactor=1.1, minNeighbors=5, minSize=(least, least)
    )
    return [
        Box(float(x) / shrink, float(y) / shrink, float(w) / shrink, float(h) / shrink)
        for (x, y, w, h) in found
    ]


def single_face(img: Image.Image) -> Box:
    faces = detect(img)
    if not faces:
        raise FaceError(
            "no face found: a face crop needs one frontal, upright face looking at the camera"
        )
    if len(faces) > 1:
        raise FaceError(f"{len(faces)} faces found: a face crop needs exactly one person")
    return faces[0]


def crown_from_mask(face: Box, alpha: np.ndarray) -> float | None:
    """Top of the head: the first subject row above the face, over its middle half."""
    left, right = int(face.x + face.w * 0.25), int(face.x + face.w * 0.75)
    top = max(0, int(face.y - 1.2 * face.h))
    band = alpha[top : int(face.y + 1), max(0, left) : max(0, right)]
    rows = np.nonzero((band > 128).any(axis=1))[0]
    if rows.size == 0:
        return None
    crown = top + float(rows[0])
    # A head cut by the photo's top edge: the mask cannot tell; estimate.
    return crown if crown > 0 else None


def head_span(face: Box, crown: float | None = None) -> tuple[float, float]:
    """(crown_y, chin_y) in input pixels."""
    chin = face.y + face.h * (1 + CHIN_BELOW)
    top = crown if crown is not None else face.y - CROWN_ABOVE * face.h
    return top, chin


def passport_frame(face: Box, crown: float | None) -> Frame:
    """Scale the head to 34 mm, centre it, leave equal space above and below."""
    top, chin = head_span(face, crown)
    head = chin - top
    scale = PASSPORT_HEAD_PX / head
    if scale > MAX_UPSCALE:
        raise FaceError(
            f"the face is too small for a {DPI} dpi passport photo: the head is {head:.0f} px "
            f"tall, at least {PASSPORT_HEAD_PX / MAX_UPSCALE:.0f} px is needed"
        )
    width, height = PASSPORT_SIZE
    margin = (height - PASSPORT_HEAD_PX) / 2
    return Frame(PASSPORT_SIZE, scale, width / 2 - face.cx * scale, margin - top * scale)


def portrait_frame(face: Box, image: tuple[int, int], aspect: float) -> Frame:
    """A width:height = aspect crop at the photo's own resolution.

    The head fills 60% of the height; the face stays centred horizontally
    (and, for square crops, vertically). Where the photo is too small the
    crop shrinks around the face, down to the face itself; beyond that the
    missing part is white.
    """
    top, chin = head_span(face)
    height = (chin - top) / 0.6
    width = height * aspect
    if aspect == 1:
        # Square: the face exactly centred, so shrink the crop around it.
        centre_y = face.cy
        room_y = min(centre_y, image[1] - centre_y)
    else:
        # Portrait: centred across; head a little above the middle, moved
        # down or up to stay inside the photo where it can.
        centre_y = top + (chin - top) / 2 + 0.05 * height
        room_y = image[1] / 2
    room_x = min(face.cx, image[0] - face.cx)
    fit = min(1.0, 2 * room_x / width, 2 * room_y / height)
    fit = max(fit, 1.2 * face.h / height)  # never crop into the face
    width, height = width * fit, height * fit
    if aspect != 1:
        centre_y = min(max(centre_y, height / 2), image[1] - height / 2)
    return Frame(
        (max(1, round(width)), max(1, round(height))),
        1.0,
        round(width / 2 - face.cx),
        round(height / 2 - centre_y),
    )
