"""Bounded alpha matting stays close to rembg's unbounded matte on a real photo (real model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from services.inference import matting, pipeline
from services.inference.models import ModelCatalog


@pytest.fixture(scope="module")
def cat_and_mask(real_model_dir: Path) -> tuple[Image.Image, Image.Image]:
    catalog = ModelCatalog.load(real_model_dir, ["isnet-general-use"], ["CPUExecutionProvider"], 2)
    # 1353x900 (1.2 MP): large enough for a real edge, small enough to matte unbounded here.
    img = Image.fromarray(skimage.data.chelsea()).resize((1353, 900), Image.Resampling.LANCZOS)
    return img, pipeline._mask(img, "", catalog)


def test_matte_solved_on_a_quarter_of_the_pixels_matches_the_unbounded_one(
    cat_and_mask: tuple[Image.Image, Image.Image],
) -> None:
    from rembg.bg import alpha_matting_cutout

    img, mask = cat_and_mask
    unbounded = alpha_matting_cutout(img, mask, 240, 10, 10)
    bounded = matting.cutout(img, mask, work_pixels=img.width * img.height // 4)
    assert bounded.size == img.size and bounded.mode == "RGBA"

    ours = np.asarray(bounded.getchannel("A"), dtype=np.float64)
    theirs = np.asarray(unbounded.getchannel("A"), dtype=np.float64)
    sure_fg, sure_bg = matting.trimap_masks(np.asarray(mask), matting.ERODE_SIZE)
    band = ~(sure_fg | sure_bg)
    assert band.mean() > 0.01  # there is an edge to matte
    # The subject is kept whole and the background gone, exactly as rembg has them...
    assert (ours[sure_fg] == 255).all() and (ours[sure_bg] == 0).all()
    assert np.array_equal(
        np.asarray(bounded)[sure_fg][:, :3], np.asarray(img.convert("RGB"))[sure_fg]
    )
    # ...and the edge differs little, on the whole photo and within the band: measured
    # 1.7 and 4.6 (/255), where the naive cutout (no matting) is 13.2 and 30.7 away.
    assert np.abs(ours - theirs).mean() <= 3.0
    assert np.abs(ours - theirs)[band].mean() <= 10.0
    opaque = (ours >= 128).mean(), (theirs >= 128).mean()
    assert abs(opaque[0] - opaque[1]) <= 0.005


def test_small_photos_are_matted_exactly_as_rembg_does(
    cat_and_mask: tuple[Image.Image, Image.Image],
) -> None:
    from rembg.bg import alpha_matting_cutout

    img, mask = cat_and_mask
    small, small_mask = img.resize((451, 300)), mask.resize((451, 300))
    ours = matting.cutout(small, small_mask)
    assert np.array_equal(
        np.asarray(ours), np.asarray(alpha_matting_cutout(small, small_mask, 240, 10, 10))
    )
