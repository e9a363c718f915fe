"""Images the tests send: JPEG bytes of an array, and real photos from scikit-image."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg(array: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def sample_photos() -> dict[str, bytes]:
    """Real photos that ship with scikit-image, as JPEG bytes."""
    import skimage.data

    return {
        "astronaut": jpeg(skimage.data.astronaut()),
        "chelsea": jpeg(skimage.data.chelsea()),
        "coffee": jpeg(skimage.data.coffee()),
        # 150x100: for runs of hundreds of jobs where the pixels do not matter.
        "coffee_small": jpeg(skimage.data.coffee()[::4, ::4]),
    }
