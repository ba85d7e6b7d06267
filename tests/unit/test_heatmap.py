"""Heatmap galleries and overlays; localisation AUROC against tumour masks; confusion matrices."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest

from efcm.config import PatchParams
from efcm.evaluation import geojson
from efcm.evaluation.heatmap import (
    check_size,
    colour_map,
    gallery,
    legend_height,
    overlay,
    render,
)
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
from tests.geojson_check import check_attention_geojson

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


# -- the rendered heatmap (size, pyramid level, legend) and the GeoJSON ----------------------------

LEVEL_COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (120, 120, 120))  # RGB per level


def level_coloured_slide(path: Path, side: int, levels: int = 3, factor: int = 4) -> Path:
    """A pyramidal TIFF whose level i is one flat colour, LEVEL_COLOURS[i]: the colour of a
    heatmap's background says which level it was read from."""
    import tifffile

    tile = 256
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(levels):
            n = side // factor**level
            block = np.empty((tile, tile, 3), np.uint8)
            block[:] = LEVEL_COLOURS[level]
            count = (-(-n // tile)) ** 2
            tif.write(
                (block for _ in range(count)),
                shape=(n, n, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="zlib",
                subfiletype=1 if level else 0,
                resolution=(1e4 / (0.5 * factor**level),) * 2,
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    return path


def background(img: np.ndarray, size: int) -> np.ndarray:
    """The median colour of the slide area above the legend band (no patches drawn there)."""
    band = legend_height(size)
    return np.median(img[: img.shape[0] - band].reshape(-1, 3), axis=0)


@pytest.mark.parametrize(
    ("size", "level"),
    [(256, 2), (1024, 1), (2000, 0)],  # levels of 4096, 1024 and 256 px: not smaller than asked
)
def test_heatmap_reads_the_level_closest_to_its_size_not_smaller(tmp_path, size, level):
    slide_path = level_coloured_slide(tmp_path / "levels.tif", 4096)
    with openslide.OpenSlide(str(slide_path)) as slide:
        assert slide.level_dimensions == ((4096, 4096), (1024, 1024), (256, 256))
        img = render(slide, np.zeros((0, 2), np.int64), 256, np.zeros(0), size)
    assert max(img.shape[:2]) == size
    np.testing.assert_allclose(background(img, size), LEVEL_COLOURS[level], atol=3)


def test_heatmap_of_a_big_slide_is_the_requested_size_with_patches_where_they_are(tmp_path):
    # 16384 px, 4 levels down to 256: a 512 px heatmap reads level 2 (1024 px), never level 0
    slide_path = level_coloured_slide(tmp_path / "big.tif", 16384, levels=4)
    coords = np.array([[0, 0], [8192, 8192]])
    with openslide.OpenSlide(str(slide_path)) as slide:
        img = render(slide, coords, 4096, np.array([0.1, 0.9]), 512)
    band = legend_height(512)
    assert img.shape == (512, 512 - band, 3)  # a square slide drawn (512 - band) px square
    np.testing.assert_allclose(background(img, 512), LEVEL_COLOURS[2], atol=3)
    s = (512 - band) / 16384  # output px per level-0 px
    low = img[int(2048 * s), int(2048 * s)]  # inside patch 0 (lowest attention)
    high = img[int(10240 * s), int(10240 * s)]  # inside patch 1 (highest)
    # each half-blended with its percentile's colour: 0 for the lowest, 1 for the highest
    bg = np.asarray(LEVEL_COLOURS[2], float)
    lo_c, hi_c = colour_map(np.array([0.0, 1.0])).astype(float)
    np.testing.assert_allclose(low, (bg + lo_c) / 2, atol=4)
    np.testing.assert_allclose(high, (bg + hi_c) / 2, atol=4)


def test_heatmap_longest_side_is_the_requested_size_for_any_slide_shape(tmp_path):
    for name, w, h in (("wide", 1536, 768), ("tall", 512, 1536)):
        path = tmp_path / f"{name}.tif"
        write_slide(path, SlideSpec(w, h, mpp=0.5, levels=2, seed=1))
        with openslide.OpenSlide(str(path)) as slide:
            for size in (64, 700, 2048):  # 2048: a slide smaller than the heatmap is scaled up
                img = render(slide, np.array([[0, 0]]), 256, np.array([1.0]), size)
                assert max(img.shape[:2]) == size, (name, size, img.shape)
                if name == "tall":  # widened so the legend stays legible
                    assert img.shape[1] >= min(size, 360)


def test_heatmap_has_a_colour_legend_from_blue_to_red(tmp_path):
    path = tmp_path / "s.tif"
    write_slide(path, SlideSpec(1024, 1024, mpp=0.5, levels=2, seed=1))
    with openslide.OpenSlide(str(path)) as slide:
        img = render(slide, np.array([[0, 0], [512, 512]]), 256, np.array([0.2, 0.8]), 1024)
    band = img[img.shape[0] - legend_height(1024) :]
    jet = colour_map(np.array([0.0, 0.5, 1.0])).astype(int)
    # the bar's colours, left to right: the lowest percentile's, the median's, the highest's
    row = band[band.shape[0] // 4].astype(int)
    dist = [np.abs(row - c).sum(axis=1) for c in jet]
    xs = [int(np.argmin(d)) for d in dist]
    assert all(d.min() <= 12 for d in dist), [int(d.min()) for d in dist]
    assert xs[0] < xs[1] < xs[2] and xs[2] - xs[0] > band.shape[1] // 2
    assert (band[band.shape[0] // 2 :] < 80).all(axis=2).any()  # the title's dark text
    # the slide area above keeps the slide's own colours: no bar there
    assert np.abs(img[: -legend_height(1024)].astype(int) - jet[0]).sum(axis=2).min() > 12


@pytest.mark.parametrize("size", [63, 8193, 0, -5, 512.5, True, "1024"])
def test_heatmap_size_out_of_range_is_refused_naming_it(size):
    with pytest.raises(ValueError, match="heatmap_size must be"):
        check_size(size, "heatmap_size")


def test_geojson_is_one_closed_tile_per_patch_with_the_attention_as_measurements():
    coords = np.array([[0, 0], [256, 0], [900, 700]])  # the last patch runs off the slide's edge
    attention = np.array([0.2, 0.5, 0.3], np.float32)
    doc = json.loads(geojson.encode(geojson.tiles(coords, 256, attention, (1000, 800))))
    check_attention_geojson(doc, coords, 256, attention, (1000, 800))
    assert doc["features"][2]["geometry"]["coordinates"][0][2] == [1000, 800]  # clipped
    pct = [f["properties"]["measurements"]["attention percentile"] for f in doc["features"]]
    assert pct == [0.0, 100.0, 50.0]


def test_geojson_refuses_mismatched_or_outside_patches():
    with pytest.raises(ValueError, match="2 coords but 1 attention"):
        geojson.tiles(np.zeros((2, 2)), 256, np.ones(1), (100, 100))
    with pytest.raises(ValueError, match="patch 0 at \\(100, 0\\) lies outside the 100 x 100"):
        geojson.tiles(np.array([[100, 0]]), 256, np.ones(1), (100, 100))
