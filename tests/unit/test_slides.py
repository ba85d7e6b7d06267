"""Synthetic slides, the reader, tissue segmentation, the patch grid and the patch batch."""

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import pytest

from efcm.config import PatchParams
from efcm.errors import InvalidSlide
from efcm.io.manifest import SlideEntry, read_manifest
from efcm.slides.batch import patch_manifest, patch_slide
from efcm.slides.patching import read_coords
from efcm.slides.reader import open_slide, resolve_mpp
from efcm.slides.synthetic import MASK_DOWNSAMPLE, SlideSpec, write_demo_dataset, write_slide

P64 = PatchParams(target_mpp=1.0, patch_size=64, step=64)


@pytest.fixture(scope="module")
def tumour_slide(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    masks = write_slide(d / "t.tif", SlideSpec(2048, 1536, tumour=True, seed=5))
    return d / "t.tif", masks


def test_synthetic_slide_is_a_pyramidal_tiff_openslide_reads(tumour_slide):
    path, masks = tumour_slide
    with openslide.OpenSlide(str(path)) as s:
        assert s.properties["openslide.vendor"] == "generic-tiff"
        assert s.level_count >= 3
        assert s.dimensions == (2048, 1536)
        assert s.level_downsamples[:3] == pytest.approx((1, 4, 16))
        mpp = resolve_mpp(s)
        assert mpp.value == pytest.approx(0.5, rel=1e-3)
    assert masks["tumour"].any() and masks["tissue"].any()
    assert not (masks["tumour"] & ~masks["tissue"].astype(bool)).any()


def test_synthetic_slides_are_deterministic(tmp_path):
    a = write_slide(tmp_path / "a.tif", SlideSpec(1024, 1024, seed=9, tumour=True))
    b = write_slide(tmp_path / "b.tif", SlideSpec(1024, 1024, seed=9, tumour=True))
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()
    assert np.array_equal(a["tumour"], b["tumour"])


def test_normal_slide_has_no_tumour(tmp_path):
    masks = write_slide(tmp_path / "n.tif", SlideSpec(1024, 1024, seed=1, tumour=False))
    assert not masks["tumour"].any()


def _tissue_mask_px(slide: Path) -> float:
    """Tissue area of a synthetic slide in mask px, read from its level 1 (not background-white)."""
    with openslide.OpenSlide(str(slide)) as s:
        rgb = np.asarray(s.read_region((0, 0), 1, s.level_dimensions[1]).convert("RGB"), float)
        level_px = (s.level_downsamples[1] / MASK_DOWNSAMPLE) ** 2
    saturation = (rgb.max(2) - rgb.min(2)) / np.maximum(rgb.max(2), 1)
    return float((saturation > 0.1).sum() * level_px)


def test_demo_tumour_is_a_few_percent_of_the_tissue_and_some_slides_have_only_foci(tmp_path):
    manifest = write_demo_dataset(tmp_path, 8, size=3072, levels=2, slides_per_case=1, seed=3)
    rows = read_manifest(manifest).slides
    patch_px = (256 // MASK_DOWNSAMPLE) ** 2  # a 128 px patch at 1 um/px on a 0.5 um/px slide
    regions, foci = [], []
    for row in rows:
        mask = cv2.imread(str(tmp_path / "masks" / f"{row.slide_id}.png"), cv2.IMREAD_GRAYSCALE)
        if row.label == "normal":
            assert not mask.any(), row.slide_id
            continue
        _, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8))
        largest = stats[1:, cv2.CC_STAT_AREA].max()
        share = (mask > 0).sum() / _tissue_mask_px(tmp_path / row.uri)
        if largest < patch_px / 2:  # only foci, each smaller than half a patch
            foci.append(share)
        else:
            regions.append(share)
            assert largest >= patch_px, (row.slide_id, largest)  # at least a patch in area
    assert len(regions) == 3 and len(foci) == 1
    assert all(0.03 <= share <= 0.15 for share in regions), regions
    assert all(0 < share < 0.03 for share in foci), foci


def test_patches_lie_on_tissue(tumour_slide, tmp_path):
    path, masks = tumour_slide
    params = P64.model_copy(update={"min_tissue_fraction": 0.5})
    row = patch_slide(SlideEntry("t", "c", str(path), "tumour"), Path("/"), tmp_path, params)
    assert row["status"] == "ok" and row["n_patches"] > 10
    cf = read_coords(tmp_path / "patches" / "t.h5")
    size0 = 128  # 64 px at 1.0 um/px on a 0.5 um/px slide
    s = size0 // MASK_DOWNSAMPLE
    fractions = [
        masks["tissue"][
            y // MASK_DOWNSAMPLE : y // MASK_DOWNSAMPLE + s,
            x // MASK_DOWNSAMPLE : x // MASK_DOWNSAMPLE + s,
        ].mean()
        for x, y in cf.coords
    ]
    # the thumbnail is 16x coarser than level 0, so edge patches may hold a little less tissue
    assert np.mean(fractions) > 0.8 and np.mean(np.array(fractions) >= 0.25) > 0.9
    # and the grid covers the tissue: most tissue area lies under some patch
    covered = np.zeros_like(masks["tissue"])
    for x, y in cf.coords:
        cy, cx = y // MASK_DOWNSAMPLE, x // MASK_DOWNSAMPLE
        covered[cy : cy + s, cx : cx + s] = 1
    assert (covered & masks["tissue"]).sum() / masks["tissue"].sum() > 0.8
    assert cf.read_size == size0 and cf.patch_size == 64 and cf.patch_level == 0
    with h5py.File(tmp_path / "patches" / "t.h5") as f:
        attrs = dict(f["coords"].attrs)
    for key in (
        "patch_size",
        "patch_level",
        "downsample",
        "level_dim",
        "name",
        "mpp",
        "mpp_source",
        "read_size",
        "target_mpp",
    ):
        assert key in attrs
    assert attrs["mpp_source"] == "openslide"
    assert (tmp_path / "qc" / "t.png").stat().st_size > 0


def test_slide_without_tissue_is_reported_not_raised(tmp_path):
    write_slide(tmp_path / "blank.tif", SlideSpec(1024, 1024, tissue=False))
    row = patch_slide(
        SlideEntry("blank", "c", str(tmp_path / "blank.tif"), "normal"), Path("/"), tmp_path, P64
    )
    assert row["status"] == "no_tissue" and "no tissue" in row["reason"]
    # an empty coords file (so a rerun skips the slide), the QC PNG and an empty GeoJSON
    assert len(read_coords(tmp_path / "patches" / "blank.h5").coords) == 0
    assert (tmp_path / "qc" / "blank.png").is_file()
    assert json.loads((tmp_path / "qc" / "blank.geojson").read_text())["features"] == []


def test_slide_without_mpp_fails_with_how_to_unless_given(tmp_path):
    write_slide(tmp_path / "nompp.tif", SlideSpec(1024, 1024, mpp=None, seed=2))
    entry = SlideEntry("nompp", "c", str(tmp_path / "nompp.tif"), "normal")
    row = patch_slide(entry, Path("/"), tmp_path, P64)
    assert row["status"] == "no_mpp"
    assert "default_mpp" in row["reason"] and "mpp" in row["reason"]
    row = patch_slide(entry, Path("/"), tmp_path, P64.model_copy(update={"default_mpp": 0.5}))
    assert row["status"] == "ok" and row["mpp_source"] == "default"
    with_override = SlideEntry("nompp", "c", str(tmp_path / "nompp.tif"), "normal", mpp=0.25)
    row = patch_slide(with_override, Path("/"), tmp_path, P64)
    assert row["mpp_source"] == "override" and float(row["mpp"]) == 0.25


def test_bad_files_get_status_rows_and_the_batch_goes_on(tmp_path, tiny_dataset):
    good = read_manifest(tiny_dataset).slides[0]
    (tmp_path / "zero.svs").write_bytes(b"")
    (tmp_path / "random.svs").write_bytes(np.random.default_rng(0).bytes(50_000))
    (tmp_path / "folder.tif").mkdir()
    manifest = tmp_path / "m.csv"
    good_uri = str(tiny_dataset.parent / good.uri)
    manifest.write_text(
        "slide_id,case_id,uri,label\n"
        f"good,c1,{good_uri},{good.label}\n"
        "zero,c2,zero.svs,normal\nrandom,c3,random.svs,normal\n"
        "folder,c4,folder.tif,normal\nmissing,c5,nope.svs,normal\n"
    )
    rows = {
        r["slide_id"]: r for r in patch_manifest(read_manifest(manifest), tmp_path / "out", P64)
    }
    assert rows["good"]["status"] == "ok"
    assert rows["zero"]["status"] == "unreadable" and "empty" in rows["zero"]["reason"]
    assert rows["random"]["status"] == "unreadable"
    assert "is a directory" in rows["folder"]["reason"]
    assert rows["missing"]["status"] == "missing"
    status = (tmp_path / "out" / "status.csv").read_text()
    assert status.count("\n") == 6


def test_rerun_skips_finished_slides(tmp_path, tiny_dataset):
    m = read_manifest(tiny_dataset)
    first = patch_manifest(m, tmp_path, P64)
    second = patch_manifest(m, tmp_path, P64)
    assert all(r["reason"] == "already done" for r in second)
    assert [r["n_patches"] for r in first] == [r["n_patches"] for r in second]


def test_clam_layout_coords_are_read_with_fallback(tmp_path):
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=np.array([[0, 0], [256, 0]], np.int64))
        d.attrs["patch_size"] = 256
        d.attrs["patch_level"] = 0
    cf = read_coords(path)
    assert cf.read_size == 256 and cf.patch_size == 256 and len(cf.coords) == 2


def test_trident_layout_coords_are_read_at_level0(tmp_path):
    path = tmp_path / "trident.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=np.array([[0, 0], [512, 0]], np.int64))
        d.attrs.update(
            {
                "patch_size": 256,
                "patch_size_level0": 512,
                "level0_magnification": 40,
                "target_magnification": 20,
            }
        )
    cf = read_coords(path)
    assert (cf.patch_level, cf.read_size, cf.patch_size) == (0, 512, 256)


def test_open_slide_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.svs"):
        open_slide(tmp_path / "nope.svs")
    (tmp_path / "x.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(InvalidSlide, match=r"x\.tif"):
        open_slide(tmp_path / "x.tif")


def test_real_svs_gives_tissue_patches(shared_data, tmp_path):
    svs = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    row = patch_slide(
        SlideEntry("cmu", "c", str(svs), "normal"), Path("/"), tmp_path, PatchParams()
    )
    assert row["status"] == "ok", row
    assert row["mpp_source"] == "openslide"
    cf = read_coords(tmp_path / "patches" / "cmu.h5")
    assert 30 <= len(cf.coords) <= 70  # CLAM's bwh_biopsy preset keeps 50 here
    w, h = 2220, 2967
    assert (cf.coords[:, 0] + cf.read_size <= w).all() and (
        cf.coords[:, 1] + cf.read_size <= h
    ).all()


class _FakeSlide:
    def __init__(self, props):
        self.properties = props


@pytest.mark.parametrize(
    ("props", "override", "default", "expected"),
    [
        (
            {
                "openslide.mpp-x": "0.25",
                "tiff.XResolution": "20000",
                "tiff.ResolutionUnit": "centimeter",
            },
            None,
            None,
            (0.25, "openslide"),
        ),
        (
            {"tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"},
            None,
            None,
            (0.5, "tiff"),
        ),
        ({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"}, None, None, (0.5, "tiff")),
        ({"openslide.objective-power": "40"}, None, 1.0, (0.25, "objective_power")),
        ({"tiff.ResolutionUnit": "none", "tiff.XResolution": "1"}, None, 0.3, (0.3, "default")),
        ({"openslide.mpp-x": "0.25"}, 0.5, None, (0.5, "override")),
    ],
)
def test_mpp_resolution_order(props, override, default, expected):
    mpp = resolve_mpp(_FakeSlide(props), override=override, default=default)
    assert (round(mpp.value, 6), mpp.source) == expected


def test_no_mpp_anywhere_is_an_error_with_the_how_to():
    with pytest.raises(InvalidSlide, match=r"mpp.*column in the manifest.*patch\.default_mpp"):
        resolve_mpp(_FakeSlide({}), name="s1")


def test_override_csv_wins_and_is_checked(tmp_path, tiny_dataset):
    from efcm.io.manifest import apply_mpp_overrides

    m = read_manifest(tiny_dataset)
    sid = m.slides[0].slide_id
    (tmp_path / "o.csv").write_text(f"slide_id,mpp\n{sid},0.25\n")
    m2 = apply_mpp_overrides(m, tmp_path / "o.csv")
    assert m2.slides[0].mpp == 0.25 and m2.slides[1].mpp is None
    rows = patch_manifest(m2, tmp_path / "out", P64)
    assert rows[0]["mpp_source"] == "override" and rows[0]["mpp"] == "0.25"
    assert rows[1]["mpp_source"] == "openslide"
    (tmp_path / "bad.csv").write_text("slide_id,mpp\nnope,0.5\n")
    with pytest.raises(ValueError, match="'nope' is not in the manifest"):
        apply_mpp_overrides(m, tmp_path / "bad.csv")


def test_transparent_pixels_read_as_white_background():
    from PIL import Image

    from efcm.slides.reader import read_rgb

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2] = (200, 100, 50, 255)  # scanned
    rgba[2:] = (0, 0, 0, 0)  # outside the scanned area

    class Fake:
        def read_region(self, location, level, size):
            return Image.fromarray(rgba, "RGBA")

    out = read_rgb(Fake(), (0, 0), 0, (4, 4))
    assert out[0, 0].tolist() == [200, 100, 50] and out[3, 3].tolist() == [255, 255, 255]
    rgba[2:] = (200, 100, 50, 255)
    assert read_rgb(Fake(), (0, 0), 0, (4, 4))[3, 3].tolist() == [200, 100, 50]
