"""Cutout's own mask session: rembg's pre- and post-processing, vectorised and cheaper.

rembg's sessions resize with LANCZOS, normalise in float64 one channel at a
time and resize the mask back with LANCZOS again. On a GPU that CPU work is
most of the time per image (the session itself is ~5x faster than
`rembg.remove`); on a CPU it still costs ~100 ms per megapixel. This session
does the same steps in float32, with bilinear resizes where they cost less
than LANCZOS and change little: measured on skimage's photos, mean absolute
mask difference from rembg's 0.5-0.6/255 and IoU >= 0.998 (the target is
2/255 and 0.99; tests/test_e2e_real_model.py checks it on real photos). About
0.47/255 of that is rounding the mask where rembg truncates it; truncated in
float32, our most opaque pixel was 254 on every photo (rembg's is on some).
"""

from __future__ import annotations

import contextlib
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from PIL import Image


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its input: size (width, height) and per-channel mean/std on [0, 1]."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


ISNET = Preprocessing((1024, 1024), (0.5, 0.5, 0.5), (1.0, 1.0, 1.0))
U2NET = Preprocessing((320, 320), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# rembg session names whose preprocessing this module reproduces (read off rembg's sessions).
KNOWN: dict[str, Preprocessing] = {
    "isnet-general-use": ISNET,
    "u2net": U2NET,
    "u2netp": U2NET,
    "u2net_human_seg": U2NET,
    "silueta": U2NET,
}


def custom_preprocessing(session: ort.InferenceSession) -> Preprocessing:
    """A custom file is IS-Net style; its size comes from its input shape when that is fixed."""
    shape = session.get_inputs()[0].shape
    height, width = shape[2], shape[3]
    if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
        return Preprocessing((width, height), ISNET.mean, ISNET.std)
    return ISNET


class MaskSession:
    """One ONNX Runtime session plus the steps around it; thread-safe (ORT runs are)."""

    def __init__(self, session: ort.InferenceSession, prep: Preprocessing, runs: int = 0) -> None:
        self.inner_session = session
        # At most `runs` session.run calls at once (0: no limit); the jobs around them
        # still pre- and post-process in parallel.
        self._gate: AbstractContextManager[object] = (
            threading.BoundedSemaphore(runs) if runs > 0 else contextlib.nullcontext()
        )
        self.prep = prep
        self._input = session.get_inputs()[0].name
        self._mean = np.asarray(prep.mean, dtype=np.float32)
        self._inv_std = 1.0 / np.asarray(prep.std, dtype=np.float32)

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """RGB, resized to the model's input, scaled by its max, normalised, NCHW float32."""
        w, h = self.prep.size
        # Upscaling is where the filter shows (rembg's LANCZOS is cheap on a small source);
        # downscaling a large photo with PIL's area-aware bilinear filter stays within 0.2/255.
        shrinking = img.width >= w and img.height >= h
        flt = Image.Resampling.BILINEAR if shrinking else Image.Resampling.LANCZOS
        small = img.convert("RGB").resize(self.prep.size, flt)
        arr = np.asarray(small, dtype=np.float32)
        arr *= 1.0 / max(float(arr.max()), 1e-6)
        arr -= self._mean
        arr *= self._inv_std
        return np.ascontiguousarray(arr.transpose(2, 0, 1))[np.newaxis]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self._gate:
            out: np.ndarray = self.inner_session.run(None, {self._input: batch})[0]
        return out

    @staticmethod
    def postprocess(pred: np.ndarray, size: tuple[int, int]) -> Image.Image:
        """Min-max normalise the first output channel and resize it to the image's size."""
        pred = pred[0, 0] if pred.ndim == 4 else pred[0]
        lo, hi = float(pred.min()), float(pred.max())
        scaled = (pred - lo) * (255.0 / max(hi - lo, 1e-12))
        # Rounded, not truncated: in float32 the maximum often lands at 254.99998, which
        # truncation made 254, so no cutout pixel was ever fully opaque.
        mask = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # mode L
        return mask.resize(size, Image.Resampling.BILINEAR)

    def predict(self, img: Image.Image) -> list[Image.Image]:
        return [self.postprocess(self.infer(self.preprocess(img)), img.size)]
