"""The `patch` stage over a manifest: tissue mask + patch grid per slide, a status row per slide.

One bad slide never stops the batch: its error becomes a status row. Outputs are written
atomically, and a rerun reuses a slide's coords h5 only when it is complete and was made with the
same patch settings (unless `overwrite`); any other slide is redone, and the log says why.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import openslide
from tqdm import tqdm

from efcm.config import PatchParams
from efcm.errors import InvalidSlide
from efcm.io.cache import SlideCache
from efcm.io.files import atomic_path, remove_stale_parts
from efcm.io.manifest import Manifest, SlideEntry
from efcm.io.status import NO_TISSUE, OK, write_status
from efcm.slides.patching import (
    PatchGeometry,
    geometry,
    made_with,
    patch_coords,
    patch_settings,
    read_patch_settings,
    write_coords,
)
from efcm.slides.reader import Mpp, open_slide, read_thumbnail, resolve_mpp
from efcm.slides.tissue import TissueMask, segment_tissue, to_geojson

log = logging.getLogger(__name__)


@dataclass
class PatchPlan:
    """Everything segmentation and gridding found for one slide."""

    mpp: Mpp
    geometry: PatchGeometry
    thumbnail: np.ndarray
    mask: TissueMask
    coords: np.ndarray  # (N, 2) int64 level-0 top-left


def plan_patches(
    slide: openslide.OpenSlide,
    params: PatchParams,
    *,
    mpp_override: float | None = None,
    name: str = "slide",
) -> PatchPlan:
    """mpp -> geometry -> bounded thumbnail -> tissue mask -> patch grid, for an open slide."""
    mpp = resolve_mpp(slide, override=mpp_override, default=params.default_mpp, name=name)
    if mpp.value > params.target_mpp * params.max_upsample:
        raise InvalidSlide(
            f"{name}: slide resolution {mpp.value:.4g} um/px ({mpp.source}) is coarser than the "
            f"target {params.target_mpp} um/px by more than patch.max_upsample="
            f"{params.max_upsample} (patches would be upsampled "
            f"{mpp.value / params.target_mpp:.1f}x)",
            status="too_coarse",
        )
    geom = geometry(
        list(slide.level_downsamples), list(slide.level_dimensions), mpp.value, mpp.source, params
    )
    # the segmentation scale follows the patch: one patch spans `seg_patch_px` thumbnail px
    thumb, scale = read_thumbnail(
        slide, geom.size0 / params.tissue.seg_patch_px, params.tissue.max_thumbnail_px
    )
    mask = segment_tissue(thumb, scale, params.tissue, geom.size0)
    return PatchPlan(mpp, geom, thumb, mask, patch_coords(mask, geom, params))


def _draw_qc(
    thumb: np.ndarray, mask: TissueMask, coords: np.ndarray, geom: PatchGeometry
) -> np.ndarray:
    img = cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR)
    sx, sy = mask.scale
    for x, y in coords:
        p0 = (int(x / sx), int(y / sy))
        p1 = (int((x + geom.size0) / sx), int((y + geom.size0) / sy))
        cv2.rectangle(img, p0, p1, (255, 160, 0), 1)
    cv2.drawContours(img, mask.contours, -1, (0, 200, 0), 2)
    for hs in mask.holes:
        cv2.drawContours(img, hs, -1, (0, 0, 255), 1)
    return img


def coords_complete(path: Path) -> bool:
    """A coords h5 that opens and holds a coords dataset (atomic writes make this the whole
    check)."""
    try:
        with h5py.File(path, "r") as f:
            return "coords" in f
    except OSError:
        return False


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    tmp.write_bytes(data)
    tmp.replace(path)


def write_qc(out_dir: Path, slide_id: str, plan: PatchPlan) -> None:
    """qc/<id>.png (thumbnail, tissue contours in green, holes in red, patch grid in blue) and
    qc/<id>.geojson (the contours in level-0 px, for QuPath)."""
    qc = _draw_qc(plan.thumbnail, plan.mask, plan.coords, plan.geometry)
    ok, png = cv2.imencode(".png", qc, [cv2.IMWRITE_PNG_COMPRESSION, 1])  # fast, still lossless
    if not ok:
        raise ValueError(f"{slide_id}: QC PNG encoding failed")
    _write_atomic(out_dir / "qc" / f"{slide_id}.png", png.tobytes())
    geo = to_geojson(plan.mask, {"slide_id": slide_id})
    _write_atomic(out_dir / "qc" / f"{slide_id}.geojson", json.dumps(geo).encode())


def _remove_stale_coords(path: Path, slide_id: str) -> None:
    """Delete the coords h5 an earlier run left for a slide that failed now: made with other
    settings (or from an older slide file), it would be extracted as if it were current."""
    if path.exists():
        path.unlink()
        log.info("%s: removed %s, left by an earlier run", slide_id, path)


def patch_slide(
    entry: SlideEntry,
    base_dir: Path,
    out_dir: Path,
    params: PatchParams,
    cache: SlideCache | None = None,
) -> dict[str, Any]:
    """Segment and patch one slide (a gs:// one staged into `cache`); returns its status row.
    Never raises for a bad slide.

    Writes patches/<id>.h5 (also for a slide without tissue: zero rows, so a rerun skips it), and
    the QC PNG and GeoJSON. A slide that fails keeps no coords h5 of an earlier run.
    """
    t0 = time.perf_counter()
    row: dict[str, Any] = {
        "slide_id": entry.slide_id,
        "status": OK,
        "reason": "",
        "mpp": "",
        "mpp_source": "",
        "patch_level": "",
        "n_patches": 0,
        "seconds": 0.0,
    }
    try:
        with open_slide(entry.uri, base_dir=base_dir, cache=cache) as slide:
            plan = plan_patches(slide, params, mpp_override=entry.mpp, name=entry.slide_id)
        row.update(
            mpp=f"{plan.mpp.value:.5g}",
            mpp_source=plan.mpp.source,
            patch_level=plan.geometry.patch_level,
            n_patches=len(plan.coords),
        )
        write_qc(out_dir, entry.slide_id, plan)
        if len(plan.coords) == 0:
            row.update(status=NO_TISSUE, reason="no tissue patches found (see the QC thumbnail)")
            log.warning("%s: no tissue patches found", entry.slide_id)
        path = out_dir / "patches" / f"{entry.slide_id}.h5"
        settings = patch_settings(params, mpp_override=entry.mpp)
        write_coords(path, plan.coords, plan.geometry, entry.slide_id, settings)
    except InvalidSlide as err:
        row.update(status=err.status, reason=str(err))
        log.warning("%s: %s", entry.slide_id, err)
    except FileNotFoundError as err:
        row.update(status="missing", reason=str(err))
        log.warning("%s: %s", entry.slide_id, err)
    except PermissionError as err:
        row.update(status="forbidden", reason=str(err))
        log.warning("%s: %s", entry.slide_id, err)
    except openslide.OpenSlideError as err:  # opened, but a tile cannot be decoded: truncated
        row.update(status="unreadable", reason=f"{entry.uri}: corrupt or truncated slide ({err})")
        log.warning("%s: %s", entry.slide_id, row["reason"])
    except Exception as err:  # one bad slide never stops the batch
        row.update(status="error", reason=f"{type(err).__name__}: {err}")
        log.exception("%s: unexpected error", entry.slide_id)
    if row["status"] not in (OK, NO_TISSUE):
        _remove_stale_coords(out_dir / "patches" / f"{entry.slide_id}.h5", entry.slide_id)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _skip_row(entry: SlideEntry, out_dir: Path, params: PatchParams) -> dict[str, Any] | None:
    """The status row of a slide whose outputs can be reused as they are, else None."""
    path = out_dir / "patches" / f"{entry.slide_id}.h5"
    current = patch_settings(params, mpp_override=entry.mpp)
    origin = "CLAM or an older efcm"
    if not coords_complete(path) or not made_with(
        entry.slide_id, path, "patch", read_patch_settings, current, origin
    ):
        return None
    with h5py.File(path, "r") as f:
        d = f["coords"]
        return {
            "slide_id": entry.slide_id,
            "status": OK if len(d) else NO_TISSUE,
            "reason": "already done",
            "mpp": f"{float(d.attrs['mpp']):.5g}",
            "mpp_source": str(d.attrs["mpp_source"]),
            "patch_level": int(d.attrs["patch_level"]),
            "n_patches": len(d),
            "seconds": 0.0,
        }


def patch_manifest(
    manifest: Manifest,
    out_dir: str | Path,
    params: PatchParams,
    *,
    workers: int = 1,
    overwrite: bool = False,
    cache: SlideCache | None = None,
) -> list[dict[str, Any]]:
    """Patch every slide of the manifest into out_dir/patches, out_dir/qc and out_dir/status.csv;
    gs:// slides are staged into `cache` (each worker process counts its downloads in its own copy
    of it)."""
    out = Path(out_dir)
    (out / "patches").mkdir(parents=True, exist_ok=True)
    for folder in (out / "patches", out / "qc"):
        if folder.is_dir() and (n := remove_stale_parts(folder)):
            log.info("removed %d half-written file(s) of an interrupted run in %s", n, folder)
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for entry in manifest.slides:
        done = None if overwrite else _skip_row(entry, out, params)
        if done:
            rows[entry.slide_id] = done
        else:
            todo.append(entry)
    bar = tqdm(total=len(todo), desc="patch", unit="slide", disable=None)
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = [
                pool.submit(patch_slide, e, manifest.base_dir, out, params, cache) for e in todo
            ]
            for e, fut in zip(todo, futures, strict=True):
                rows[e.slide_id] = fut.result()
                bar.update()
    else:
        for e in todo:
            rows[e.slide_id] = patch_slide(e, manifest.base_dir, out, params, cache)
            bar.update()
    bar.close()
    ordered = [rows[e.slide_id] for e in manifest.slides]
    write_status(out / "status.csv", ordered)
    return ordered
