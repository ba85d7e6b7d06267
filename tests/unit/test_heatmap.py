"""Heatmap galleries and overlays; localisation AUROC against tumour masks; confusion matrices."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from efcm.config import PatchParams
from efcm.evaluation.heatmap import gallery, overlay
from efcm.evaluation.metrics import (
    confusion,
    localisation_auroc,
    mean_localisation_auroc,
    patch_tumour_fraction,
)
from efcm.io.manifest import SlideEntry
from efcm.slides.batch import patch_slide
from efcm.slides.patches import SlidePatches
from efcm.slides.patching import read_coords
from efcm.slides.synthetic import MASK_DOWNSAMPLE, SlideSpec, write_slide

P64 = PatchParams(target_mpp=1.0, patch_size=64, step=64)


def solid_patches(n: int, size: int = 32) -> np.ndarray:
    """(n, size, size, 3): patch i is filled with grey level 5 * i, so a tile names its patch."""
    return np.stack([np.full((size, size, 3), 5 * i, np.uint8) for i in range(n)])


def tile_values(img: np.ndarray, row: int, n: int, tile: int, pad: int) -> list[int]:
    row_h = 22 + tile + pad
    cy = pad + row * row_h + 22 + tile // 2
    return [int(img[cy, pad + c * (tile + pad) + tile // 2, 0]) // 5 for c in range(n)]


def test_gallery_shows_top_scores_first_then_bottom_scores():
    scores = np.random.default_rng(0).permutation(20).astype(float)
    img = gallery(solid_patches(20), scores, 5, tile=40, pad=4)
    assert img.dtype == np.uint8
    assert img.shape == (2 * (22 + 40 + 4) + 4, 5 * 44 + 4, 3)
    assert tile_values(img, 0, 5, 40, 4) == list(np.argsort(-scores)[:5])
    assert tile_values(img, 1, 5, 40, 4) == list(np.argsort(scores)[:5])
    assert (img[4:26, :, :] < 128).any()  # the label text above the top row


def test_gallery_reads_only_the_shown_patches_and_resizes_them():
    patches = solid_patches(50, size=100)
    read: list[int] = []

    def reader(i: int) -> np.ndarray:
        read.append(i)
        return patches[i]

    scores = np.arange(50.0)
    img = gallery(reader, scores, 3, tile=24, pad=2)
    assert sorted(read) == [0, 1, 2, 47, 48, 49]
    assert img.shape == (2 * (22 + 24 + 2) + 2, 3 * 26 + 2, 3)
    assert tile_values(img, 0, 3, 24, 2) == [49, 48, 47]
    assert tile_values(img, 1, 3, 24, 2) == [0, 1, 2]


def test_gallery_of_a_small_slide_shows_every_patch_in_each_row():
    img = gallery(list(solid_patches(3)), np.array([0.2, 0.9, 0.5]), 8, tile=16, pad=2)
    assert img.shape[1] == 3 * 18 + 2
    assert tile_values(img, 0, 3, 16, 2) == [1, 2, 0]
    assert tile_values(img, 1, 3, 16, 2) == [0, 2, 1]


def test_gallery_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="4 patches but 5 scores"):
        gallery(solid_patches(4), np.zeros(5), 2)
    with pytest.raises(ValueError, match="0 scores"):
        gallery(np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0), 2)


def test_overlay_stays_at_thumbnail_scale_and_tints_only_patches():
    thumb = np.full((64, 80, 3), 200, np.uint8)
    # level-0 coords of a huge slide (16x downsampled thumbnail); one patch hangs over the edge
    coords = np.array([[0, 0], [320, 160], [1260, 1000]])
    out = overlay(thumb, (16.0, 16.0), coords, 64, np.array([0.1, 0.5, 0.9]))
    assert out.shape == thumb.shape and out.dtype == np.uint8
    changed = (out != thumb).any(2)
    assert changed[0:4, 0:4].all() and changed[10:14, 20:24].all() and changed[62:, 78:].all()
    assert changed.sum() == 16 + 16 + 4


@pytest.fixture(scope="module")
def tumour_slide(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("loc")
    masks = write_slide(d / "t.tif", SlideSpec(2048, 2048, tumour=True, seed=1))
    row = patch_slide(SlideEntry("t", "c", str(d / "t.tif"), "tumour"), Path("/"), d, P64)
    assert row["status"] == "ok"
    with h5py.File(d / "patches" / "t.h5") as f:
        size0 = int(f["coords"].attrs["size0"])
    coords = read_coords(d / "patches" / "t.h5")
    return {"dir": d, "coords": coords, "size0": size0, "mask": masks["tumour"]}


def test_attention_equal_to_tumour_fraction_localises_perfectly(tumour_slide):
    s = tumour_slide
    frac = patch_tumour_fraction(s["coords"].coords, s["size0"], s["mask"], MASK_DOWNSAMPLE)
    is_tumour = frac >= 0.5
    assert 0 < is_tumour.sum() < len(frac)  # the slide has tumour and normal patches
    auc = localisation_auroc(frac, s["coords"].coords, s["size0"], s["mask"], MASK_DOWNSAMPLE)
    assert auc == pytest.approx(1.0, abs=1e-6)
    # the mask as written to masks/<slide_id>.png (0 / 255) gives the same answer
    auc255 = localisation_auroc(
        frac, s["coords"].coords, s["size0"], s["mask"] * 255, MASK_DOWNSAMPLE
    )
    assert auc255 == pytest.approx(auc)


def test_patch_pixels_and_mask_agree_on_where_the_tumour_is(tumour_slide):
    # tumour is drawn with dense dark nuclei: darkness read from the slide must localise it, which
    # checks that coords, size0 and the mask's scale line up
    s = tumour_slide
    patches = SlidePatches(str(s["dir"] / "t.tif"), s["coords"])
    darkness = -patches.read_batch(range(len(patches))).mean((1, 2, 3))
    patches.close()
    auc = localisation_auroc(darkness, s["coords"].coords, s["size0"], s["mask"], MASK_DOWNSAMPLE)
    assert auc > 0.9


def test_random_attention_localises_at_chance(tumour_slide):
    s = tumour_slide
    n = len(s["coords"].coords)
    aucs = [
        localisation_auroc(
            np.random.default_rng(i).random(n),
            s["coords"].coords,
            s["size0"],
            s["mask"],
            MASK_DOWNSAMPLE,
        )
        for i in range(100)
    ]
    assert mean_localisation_auroc(aucs) == pytest.approx(0.5, abs=0.05)


def test_normal_slide_has_no_localisation_auroc(tmp_path):
    masks = write_slide(tmp_path / "n.tif", SlideSpec(1024, 1024, tumour=False, seed=2))
    patch_slide(SlideEntry("n", "c", str(tmp_path / "n.tif"), "normal"), Path("/"), tmp_path, P64)
    coords = read_coords(tmp_path / "patches" / "n.h5").coords
    assert len(coords) > 0
    auc = localisation_auroc(np.arange(len(coords)), coords, 128, masks["tumour"], MASK_DOWNSAMPLE)
    assert math.isnan(auc)


def test_a_patch_is_tumour_when_half_its_footprint_is():
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 1  # left half (64 level-0 px at downsample 16)
    coords = np.array([[0, 0], [32, 0], [48, 0], [64, 64], [120, 120]])
    frac = patch_tumour_fraction(coords, 64, mask, 16)
    assert frac[:4].tolist() == [1.0, 0.5, 0.25, 0.0]
    assert frac[4] == 0.0  # hangs over the mask's edge: only its part on the mask counts
    only_tumour = localisation_auroc(np.arange(2), coords[:2], 64, mask, 16)
    assert math.isnan(only_tumour)
    assert localisation_auroc(np.array([3, 2, 1, 0]), coords[:4], 64, mask, 16) == 1.0


def test_mean_localisation_auroc_skips_slides_without_one():
    assert mean_localisation_auroc({"a": 0.8, "b": float("nan"), "c": 0.6}) == pytest.approx(0.7)
    assert math.isnan(mean_localisation_auroc([float("nan")]))
    assert math.isnan(mean_localisation_auroc([]))


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    labels = np.array([0, 1, 2, 2])
    assert confusion(probs, labels, 3) == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert confusion(np.zeros((0, 2)), np.zeros(0), 2) == [[0, 0], [0, 0]]
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        confusion(probs[:, :2], labels, 3)
