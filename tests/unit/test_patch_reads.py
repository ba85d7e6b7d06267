"""Batched patch reads (`SlidePatches.read_batch`: one read_region per row run, cut apart) give
exactly the pixels of one public `read_region` per patch, on synthetic and real slides; and a
thumbnail read in threads is the one read in one thread."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest

from efcm.slides.patches import SlidePatches, row_runs
from efcm.slides.patching import CoordsFile
from efcm.slides.synthetic import SlideSpec, write_slide


def reference(path: Path, coords: CoordsFile) -> np.ndarray:
    """One public `read_region` per patch, composited on white and resized as the patching
    documents it: what every reader of a coords file has always got."""
    rs, ps = coords.read_size, coords.patch_size
    out = []
    with openslide.OpenSlide(str(path)) as slide:
        for x, y in coords.coords:
            rgba = np.asarray(slide.read_region((int(x), int(y)), coords.patch_level, (rs, rs)))
            a = rgba[..., 3:].astype(np.uint16)
            img = ((rgba[..., :3].astype(np.uint16) * a + 255 * (255 - a)) // 255).astype(np.uint8)
            if rs != ps:
                interp = cv2.INTER_AREA if rs > ps else cv2.INTER_LINEAR
                img = cv2.resize(img, (ps, ps), interpolation=interp)
            out.append(img)
    return np.stack(out)


def batched(path: Path, coords: CoordsFile, batch: int = 7) -> np.ndarray:
    sp = SlidePatches(str(path), coords)
    try:
        parts = [sp.read_batch(range(i, min(i + batch, len(sp)))) for i in range(0, len(sp), batch)]
        assert np.array_equal(sp.read(len(sp) - 1), parts[-1][-1])
        return np.concatenate(parts)
    finally:
        sp.close()


def grid(x0: int, y0: int, step: int, cols: int, rows: int) -> np.ndarray:
    return np.array(
        [[x0 + c * step, y0 + r * step] for r in range(rows) for c in range(cols)], np.int64
    )


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reads") / "s.tif"
    # 1000 px: neither a multiple of the 256-px tiles nor of the level factor (2)
    write_slide(path, SlideSpec(1000, 1000, mpp=0.5, levels=3, level_factor=2, seed=3))
    return path


@pytest.mark.parametrize(
    ("level", "read_size", "patch_size", "coords"),
    [
        # touching patches on the grid, past the slide's right and bottom edges (transparent)
        (0, 96, 96, grid(40, 60, 96, 11, 11)),
        # overlapping (step < size), with gaps in the rows, and resized down (INTER_AREA)
        (0, 100, 64, np.delete(grid(3, 5, 80, 12, 3), [4, 5, 17], axis=0)),
        # level 1 (downsample 2): positions on whole level-1 pixels are merged, odd ones not
        (1, 48, 64, np.concatenate([grid(0, 0, 96, 6, 2), grid(1, 301, 96, 6, 1)])),
        # level 1, every other patch at a half pixel (OpenSlide resamples those)
        (1, 64, 64, grid(0, 0, 97, 8, 2)),
        # level 2, read at a non-integer level position everywhere
        (2, 40, 40, grid(2, 2, 160, 6, 6)),
    ],
)
def test_batched_reads_match_one_read_per_patch(synthetic, level, read_size, patch_size, coords):
    cf = CoordsFile(coords, level, read_size, patch_size, "s", 0, 0)
    want = reference(synthetic, cf)
    assert want[:, :, :, 0].min() < 250, "the patches must show tissue, not only background"
    assert np.array_equal(batched(synthetic, cf), want)
    assert np.array_equal(batched(synthetic, cf, batch=64), want)


def test_row_runs_merge_only_adjacent_whole_pixel_patches():
    xy = np.array([[0, 0], [64, 0], [128, 0], [300, 0], [364, 0], [0, 64], [65, 64], [129, 64]])
    runs = [(lo, hi, off.tolist()) for lo, hi, off in row_runs(xy, 1.0, 64)]
    assert runs == [(0, 3, [0, 64, 128]), (3, 5, [0, 64]), (5, 6, [0]), (6, 8, [0, 64])]
    # at downsample 2, x = 65 is a half pixel: read on its own, as are its neighbours' runs
    runs = [(lo, hi) for lo, hi, _ in row_runs(xy, 2.0, 32)]
    assert runs == [(0, 3), (3, 5), (5, 6), (6, 7), (7, 8)]
    # a run never spans more than max_px
    assert [(lo, hi) for lo, hi, _ in row_runs(xy[:3], 1.0, 64, max_px=128)] == [(0, 2), (2, 3)]


@pytest.mark.parametrize(
    ("name", "level", "read_size", "patch_size", "step0"),
    [
        ("CMU-1-Small-Region.svs", 0, 257, 128, 257),  # the demo's geometry (1 um/px, 128 px)
        ("CMU-1-Small-Region.svs", 0, 224, 224, 200),  # JPEG tiles of 240 px, overlapping reads
        ("test3-DAPI-2-387.ndpi", 1, 128, 128, 256),  # a Hamamatsu pyramid's level 1
        ("test3-DAPI-2-387.ndpi", 2, 64, 96, 257),  # level 2, whole pixels and fractional ones
        ("multiframe_camelyon_challenge_image.dcm", 0, 64, 64, 64),  # DICOM frames of 256 px
    ],
)
def test_batched_reads_match_on_real_slides(shared_data, name, level, read_size, patch_size, step0):
    path = shared_data / "wsi" / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    with openslide.OpenSlide(str(path)) as slide:
        w, h = slide.dimensions
    # a grid over the whole slide, its last row and column running past the edge
    coords = grid(0, 0, step0, -(-w // step0), -(-h // step0))
    coords = coords[np.linspace(0, len(coords) - 1, min(len(coords), 400)).astype(int)]
    cf = CoordsFile(coords, level, read_size, patch_size, name, step0, step0)
    assert np.array_equal(batched(path, cf, batch=64), reference(path, cf))


def test_thumbnails_read_in_threads_are_the_same_pixels(synthetic, shared_data, monkeypatch):
    from efcm.slides import reader

    monkeypatch.setattr(reader, "_CHUNK", 300)  # many chunks, a few partly past the level's edge
    slides = [synthetic, shared_data / "wsi" / "CMU-1-Small-Region.svs"]
    for path in (p for p in slides if p.is_file()):
        with openslide.OpenSlide(str(path)) as slide:
            # downsample 3: read from level 1 of the synthetic slide, at fractional positions
            for downsample, max_px in ((1.0, 4096), (3.0, 4096), (1.0, 700)):
                one, scale = reader.read_thumbnail(slide, downsample, max_px)
                many, scale4 = reader.read_thumbnail(slide, downsample, max_px, workers=4)
                assert scale == scale4 and np.array_equal(one, many), (path.name, downsample)
