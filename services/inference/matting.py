"""Alpha matting with its memory bounded by design.

rembg's alpha_matting_cutout solves pymatting's closed-form matte on every
pixel in float64; its memory grows with the pixels: a 7.8 MP photo added
about 4 GB to the node (docs/performance.md, "Alpha matting memory"). Here:

- images up to `WORK_PIXELS` are matted exactly as rembg does (same settings,
  same pixels);
- larger ones get their matte (alpha and foreground colour) solved on a copy
  scaled down to `WORK_PIXELS`, then scaled back up and used only in the band
  the full-size trimap leaves unknown; the sure foreground and background come
  from the full-size mask, and sure-foreground colours are the photo's own;
- one matte is solved at a time per node (`_ONE_AT_A_TIME`), so two matting
  jobs on one node cannot add their peaks.

So a matting job costs at most one `WORK_PIXELS` solve plus a few bytes per
full-size pixel, whatever the photo's size.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion  # type: ignore[import-untyped]

# Pixels the matte is solved on; pymatting's memory grows with them (bench/matting.py).
WORK_PIXELS = 2_000_000
FOREGROUND_THRESHOLD = 240
BACKGROUND_THRESHOLD = 10
ERODE_SIZE = 10
_ONE_AT_A_TIME = threading.Semaphore(1)


def cutout(img: Image.Image, mask: Image.Image, work_pixels: int = WORK_PIXELS) -> Image.Image:
    """The RGBA cutout of `img` under the model's `mask`, with a matted edge."""
    from rembg.bg import alpha_matting_cutout

    with _ONE_AT_A_TIME:
        if img.width * img.height <= work_pixels:
            out: Image.Image = alpha_matting_cutout(
                img, mask, FOREGROUND_THRESHOLD, BACKGROUND_THRESHOLD, ERODE_SIZE
            )
            return out
        return _scaled_cutout(img, mask, work_pixels)


def trimap_masks(mask: np.ndarray, erode_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(sure foreground, sure background) as rembg builds its trimap from the mask."""
    structure = np.ones((erode_size, erode_size), dtype=np.uint8) if erode_size > 0 else None
    sure_fg = binary_erosion(mask > FOREGROUND_THRESHOLD, structure=structure)
    sure_bg = binary_erosion(mask < BACKGROUND_THRESHOLD, structure=structure, border_value=1)
    return sure_fg, sure_bg


def _scaled_cutout(img: Image.Image, mask: Image.Image, work_pixels: int) -> Image.Image:
    from pymatting import (  # type: ignore[import-untyped]
        estimate_alpha_cf,
        estimate_foreground_ml,
    )

    rgb = img.convert("RGB")
    scale = math.sqrt(work_pixels / (img.width * img.height))
    small_size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    small = np.asarray(rgb.resize(small_size, Image.Resampling.BOX)) / 255.0
    small_mask = np.asarray(mask.resize(small_size, Image.Resampling.BILINEAR))
    # The same band, in full-size pixels, as rembg's erosion gives at full size.
    fg, bg = trimap_masks(small_mask, max(1, round(ERODE_SIZE * scale)))
    trimap = np.full(small_mask.shape, 0.5)
    trimap[fg] = 1.0
    trimap[bg] = 0.0
    alpha = estimate_alpha_cf(small, trimap)
    colour = estimate_foreground_ml(small, alpha)
    del small, trimap, fg, bg

    def upscale(array: np.ndarray, mode: str) -> Image.Image:
        as_bytes = np.clip(array * 255 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(as_bytes, mode).resize(img.size, Image.Resampling.BILINEAR)

    alpha_full = np.asarray(upscale(alpha, "L")).copy()
    colour_full = upscale(colour, "RGB")
    del alpha, colour
    sure_fg, sure_bg = trimap_masks(np.asarray(mask), ERODE_SIZE)
    alpha_full[sure_fg] = 255
    alpha_full[sure_bg] = 0
    # Solved colours where the edge is; the photo's own everywhere it is sure.
    out = colour_full.copy()
    out.paste(rgb, mask=Image.fromarray(sure_fg))
    out.putalpha(Image.fromarray(alpha_full))
    return out
