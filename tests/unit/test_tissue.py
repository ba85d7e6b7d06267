"""Tissue segmentation: presets, the pen-mark filter, GeoJSON, the segmentation scale."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from efcm.config import ConfigError, PatchParams, TissueParams, params_from_dict
from efcm.io.manifest import SlideEntry
from efcm.slides.batch import patch_slide
from efcm.slides.patching import read_coords
from efcm.slides.synthetic import MASK_DOWNSAMPLE, SlideSpec, write_slide
from efcm.slides.tissue import ink_mask, segment_tissue, to_geojson

P64 = PatchParams(target_mpp=1.0, patch_size=64, step=64, min_tissue_fraction=0.25)
INKS = ("green", "blue", "red", "black")


def test_presets_fill_and_explicit_keys_override():
    biopsy = TissueParams(preset="biopsy")
    assert (biopsy.sthresh, biopsy.mthresh, biopsy.close, biopsy.max_n_holes) == (15, 11, 2, 2)
    assert TissueParams(preset="biopsy", close=6).close == 6
    assert TissueParams().sthresh == 8
    with pytest.raises(ConfigError, match=r"patch\.tissue\.preset"):
        params_from_dict({"patch": {"tissue": {"preset": "clam"}}})


@pytest.fixture(scope="module")
def inked_slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("ink")
    masks = write_slide(d / "ink.tif", SlideSpec(3072, 3072, seed=21, ink=INKS))
    return d / "ink.tif", masks


def _patch_mask_hits(coords: np.ndarray, mask: np.ndarray, size0: int) -> int:
    s = size0 // MASK_DOWNSAMPLE
    return sum(
        int(
            mask[
                y // MASK_DOWNSAMPLE : y // MASK_DOWNSAMPLE + s,
                x // MASK_DOWNSAMPLE : x // MASK_DOWNSAMPLE + s,
            ].any()
        )
        for x, y in coords
    )


def test_ink_strokes_next_to_tissue_get_no_patches(inked_slide, tmp_path):
    path, masks = inked_slide
    assert masks["ink"].any() and not (masks["ink"] & masks["tissue"]).any()
    row = patch_slide(SlideEntry("ink", "c", str(path), "normal"), Path("/"), tmp_path, P64)
    assert row["status"] == "ok"
    coords = read_coords(tmp_path / "patches" / "ink.h5").coords
    assert _patch_mask_hits(coords, masks["ink"], 128) == 0, "a patch lies on a pen stroke"
    assert _patch_mask_hits(coords, masks["tissue"], 128) == len(coords) > 20


def test_without_the_filter_the_strokes_are_patched(inked_slide, tmp_path):
    path, masks = inked_slide
    params = P64.model_copy(update={"tissue": TissueParams(filter_ink=False)})
    patch_slide(SlideEntry("ink", "c", str(path), "normal"), Path("/"), tmp_path, params)
    coords = read_coords(tmp_path / "patches" / "ink.h5").coords
    assert _patch_mask_hits(coords, masks["ink"], 128) > 0  # so the filter above did the work


def test_ink_mask_spares_h_and_e_colours():
    he = np.array([[[232, 166, 200], [92, 48, 142], [60, 22, 105], [200, 120, 170]]], np.uint8)
    ink = np.array([[[40, 150, 60], [40, 60, 170], [190, 30, 40], [20, 20, 20]]], np.uint8)
    params = TissueParams(mthresh=1)
    assert not ink_mask(np.repeat(np.repeat(he, 9, 0), 9, 1), params).any()
    assert ink_mask(np.repeat(np.repeat(ink, 9, 0), 9, 1), params).all()


def test_real_pen_marks_are_removed(shared_data):
    img = cv2.imread(str(shared_data / "tiles/histolab_thumbnails/tcga-green-pen.png"))
    rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    green = rgb[..., 1].astype(int) > rgb[..., 0].astype(int) + 30  # H&E is never greener than red
    assert green.mean() > 0.03  # the picture has a wide green stroke across the tissue
    kept = segment_tissue(rgb, (1.0, 1.0), TissueParams(), 16).raster.astype(bool)
    unfiltered = segment_tissue(rgb, (1.0, 1.0), TissueParams(filter_ink=False), 16).raster
    assert (kept & green).sum() < 0.1 * green.sum()
    assert (unfiltered.astype(bool) & green).sum() > 0.9 * green.sum()


def test_default_preset_finds_tissue_on_a_large_synthetic_slide(tmp_path):
    masks = write_slide(tmp_path / "big.tif", SlideSpec(12288, 12288, seed=4, levels=3))
    params = PatchParams()  # 256 px at 0.5 um/px, the default preset
    row = patch_slide(
        SlideEntry("big", "c", str(tmp_path / "big.tif"), "normal"), Path("/"), tmp_path, params
    )
    assert row["status"] == "ok"
    n_expected = masks["tissue"].sum() * MASK_DOWNSAMPLE**2 / 256**2
    assert 0.7 * n_expected < row["n_patches"] < 1.5 * n_expected


def test_geojson_rings_are_closed_and_in_level0_pixels(inked_slide, tmp_path):
    path, _ = inked_slide
    patch_slide(SlideEntry("ink", "c", str(path), "normal"), Path("/"), tmp_path, P64)
    geo = json.loads((tmp_path / "qc" / "ink.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]
    for feat in geo["features"]:
        assert feat["geometry"]["type"] == "Polygon"
        assert feat["properties"]["classification"]["name"] == "Tissue"
        for ring in feat["geometry"]["coordinates"]:
            assert ring[0] == ring[-1] and len(ring) >= 4
            xy = np.array(ring)
            assert xy.min() >= 0 and xy.max() <= 3072


def test_geojson_of_hand_made_mask():
    from efcm.slides.tissue import TissueMask

    square = np.array([[[1, 1]], [[9, 1]], [[9, 9]], [[1, 9]]], np.int32)
    hole = np.array([[[4, 4]], [[5, 4]], [[5, 5]], [[4, 5]]], np.int32)
    geo = to_geojson(TissueMask([square], [[hole]], (2.0, 3.0), (10, 10)))
    (feat,) = geo["features"]
    outer, inner = feat["geometry"]["coordinates"]
    assert outer[0] == [2.0, 3.0] and outer[2] == [18.0, 27.0] and outer[-1] == outer[0]
    assert inner[0] == [8.0, 12.0]


def test_slide_coarser_than_target_is_refused_with_the_ratio(tmp_path):
    write_slide(tmp_path / "c.tif", SlideSpec(1024, 1024, mpp=4.0, seed=1))
    row = patch_slide(
        SlideEntry("c", "c", str(tmp_path / "c.tif"), "normal"), Path("/"), tmp_path, P64
    )
    assert row["status"] == "too_coarse" and "upsampled 4.0x" in row["reason"]
    ok = P64.model_copy(update={"max_upsample": 8.0})
    row = patch_slide(
        SlideEntry("c", "c", str(tmp_path / "c.tif"), "normal"), Path("/"), tmp_path, ok
    )
    assert row["status"] == "ok"
