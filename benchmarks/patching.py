"""Benchmark of `efcm patch` per slide: segmentation, grid, total vs the OpenSlide floor.

For a large synthetic slide (default 40,960 x 40,960 px at 0.25 um/px, 3 levels, written once into
the cache folder) and every real slide in ../shared/data/wsi, each measured in a fresh process:
  floor_s        opening the slide and reading the segmentation level with plain OpenSlide
                 (`read_region` of that whole level): the least any tissue detector must do
  thumbnail_s    our bounded, chunked thumbnail read
  segment_s      tissue segmentation (efcm.slides.tissue.segment_tissue)
  grid_s         the patch grid (efcm.slides.patching.patch_coords)
  total_s        the whole `patch_slide`: open, mpp, thumbnail, segmentation, grid, coords h5, QC
                 PNG and GeoJSON
  total_over_floor, patches, patches_per_s, peak_rss_mb
Prints one JSON object. Usage: python benchmarks/patching.py [--size 40960] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_WSI = ROOT.parent / "shared" / "data" / "wsi"


def _measure(uri: str, params_json: str) -> dict:
    import openslide

    from efcm.config import PatchParams
    from efcm.io.manifest import SlideEntry
    from efcm.slides.batch import patch_slide
    from efcm.slides.patching import geometry, patch_coords
    from efcm.slides.reader import best_level, read_thumbnail, resolve_mpp
    from efcm.slides.tissue import segment_tissue

    params = PatchParams.model_validate_json(params_json)
    with openslide.OpenSlide(uri) as s:
        mpp = resolve_mpp(s, default=params.default_mpp)
        g = geometry(
            list(s.level_downsamples), list(s.level_dimensions), mpp.value, mpp.source, params
        )
        wanted = g.size0 / params.tissue.seg_patch_px
    t0 = time.perf_counter()
    with openslide.OpenSlide(uri) as s:  # the floor: plain OpenSlide reads the level we use
        w0, h0 = s.dimensions
        level = best_level(s, max(wanted, max(w0, h0) / params.tissue.max_thumbnail_px))
        s.read_region((0, 0), level, s.level_dimensions[level])
    floor = time.perf_counter() - t0
    with openslide.OpenSlide(uri) as s:
        t0 = time.perf_counter()
        thumb, scale = read_thumbnail(s, wanted, params.tissue.max_thumbnail_px)
        t_thumb = time.perf_counter() - t0
    t0 = time.perf_counter()
    mask = segment_tissue(thumb, scale, params.tissue, g.size0)
    t_seg = time.perf_counter() - t0
    t0 = time.perf_counter()
    coords = patch_coords(mask, g, params)
    t_grid = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        row = patch_slide(SlideEntry("bench", "c", uri, "x"), Path("/"), Path(out), params)
        total = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "status": row["status"],
        "dimensions": [w0, h0],
        "mpp": mpp.value,
        "segmentation_level": level,
        "thumbnail_px": list(thumb.shape[1::-1]),
        "floor_s": round(floor, 4),
        "thumbnail_s": round(t_thumb, 4),
        "segment_s": round(t_seg, 4),
        "grid_s": round(t_grid, 4),
        "total_s": round(total, 4),
        "total_over_floor": round(total / floor, 2) if floor else None,
        "patches": len(coords),
        "patches_per_s": round(len(coords) / total, 1) if total else None,
        "peak_rss_mb": round(rss_mb, 1),
    }


def _in_fresh_process(uri: str, params_json: str) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (uri, params_json))


def main() -> None:
    from efcm.config import PatchParams
    from efcm.slides.synthetic import SlideSpec, write_slide

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=40960, help="side of the large synthetic slide")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "efcm-bench"))
    args = ap.parse_args()
    cache = Path(args.cache)
    big = cache / f"synthetic_{args.size}.tif"
    gen_s = 0.0
    if not big.is_file():
        t0 = time.perf_counter()
        write_slide(
            big,
            SlideSpec(
                args.size,
                args.size,
                mpp=0.25,
                levels=3,
                level_factor=4,
                tumour=True,
                seed=7,
                ink=("green", "black"),
            ),
        )
        gen_s = time.perf_counter() - t0
    params = PatchParams()  # 256 px at 0.5 um/px, default preset
    results = {f"synthetic_{args.size}": _in_fresh_process(str(big), params.model_dump_json())}
    real = {
        "CMU-1-Small-Region.svs": params,
        "test3-DAPI-2-387.ndpi": params,
        "multiframe_camelyon_challenge_image.dcm": PatchParams(
            target_mpp=32.0, patch_size=16, step=16
        ),
    }
    for name, p in real.items():
        if (SHARED_WSI / name).is_file():
            results[name] = _in_fresh_process(str(SHARED_WSI / name), p.model_dump_json())
    big_r = results[f"synthetic_{args.size}"]
    print(
        json.dumps(
            {
                "benchmark": "patching",
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "large_slide_generation_s": round(gen_s, 1),
                "large_total_over_floor": big_r["total_over_floor"],
                "large_peak_rss_mb": big_r["peak_rss_mb"],
                "goals": {"total_over_floor_max": 2.0, "peak_rss_mb_max": 2048},
                "slides": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
