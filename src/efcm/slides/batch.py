"""The `patch` stage over a manifest, and the per-slide loop every batch stage runs (`SlideLoop`).

One bad slide never stops the batch: its error becomes a status row. An unexpected exception (a bug,
not a bad slide) is recorded too, but fails the batch when it hits most slides. Outputs are written
atomically, and a rerun reuses a slide's coords h5 only when it is complete and was made with the
same patch settings (unless `overwrite`); any other slide is redone, and the log says why.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import openslide
from tqdm import tqdm

from efcm.config import PatchParams
from efcm.errors import BatchFailed, InvalidInput, InvalidItem, InvalidSlide
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
    workers: int = 1,
) -> PatchPlan:
    """mpp -> geometry -> bounded thumbnail -> tissue mask -> patch grid, for an open slide;
    `workers` threads read the thumbnail (`read_thumbnail`: the same pixels)."""
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
        slide,
        geom.size0 / params.tissue.seg_patch_px,
        params.tissue.max_thumbnail_px,
        workers=workers,
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


# -- the per-slide loop of every batch stage ------------------------------------------------------

ERROR = "error"  # the status of a slide that hit an unexpected exception: a bug, not a bad slide
ALREADY_DONE = "already done"  # the reason of a slide whose outputs a rerun reused

# What a bad slide (or a bad file made from it) raises; anything else is unexpected.
EXPECTED_ERRORS: tuple[type[Exception], ...] = (InvalidInput, OSError, openslide.OpenSlideError)

SlideWork = Callable[[SlideEntry, dict[str, Any]], None]
"""A stage's work on one slide: fills the slide's status row (`status`, `reason` and the stage's
columns) and raises when the slide fails; a reused slide gets the reason `ALREADY_DONE`."""


def expected_failure(err: Exception, uri: str) -> tuple[str, str]:
    """The status code and reason of an expected per-item error (one of `EXPECTED_ERRORS`)."""
    if isinstance(err, InvalidItem):  # a bad slide or image, with its status code
        return err.status, str(err)
    if isinstance(err, FileNotFoundError):
        return "missing", str(err)
    if isinstance(err, PermissionError):
        return "forbidden", str(err)
    if isinstance(err, openslide.OpenSlideError):  # opened, but a tile cannot be decoded
        return "unreadable", f"{uri}: corrupt or truncated slide ({err})"
    return "unreadable", str(err)


@dataclass(frozen=True)
class SlideOutcome:
    """One slide's status row, and the type of the unexpected exception it hit (None if none)."""

    row: dict[str, Any]
    unexpected: str | None = None


def _unexpected_summary(hit: list[SlideOutcome], id_column: str, first: int = 3) -> str:
    """`RuntimeError on s0, s1, s2 ...; KeyError on s5`: the first slides of each type."""
    by_type: dict[str, list[str]] = {}
    for o in hit:
        by_type.setdefault(str(o.unexpected), []).append(o.row[id_column])
    return "; ".join(
        f"{kind} on {', '.join(ids[:first])}{' ...' if len(ids) > first else ''}"
        for kind, ids in by_type.items()
    )


@dataclass(frozen=True)
class SlideLoop:
    """The one per-slide loop of the batch stages (`patch`, `extract`): every slide gets a status
    row, and a bad slide never stops the batch.

    An expected error (`EXPECTED_ERRORS`: a bad slide or file) becomes the slide's status and
    reason (see `expected_failure`). Any other exception is a bug: it is logged with its
    traceback, recorded with status `error` (the reason is its type and message) and counted apart;
    when it hits more than half of the attempted slides (reused slides are not attempted),
    `run` raises `BatchFailed` after writing the status CSV, whatever the stage's `fail_on` says
    (that governs the expected failures: see `check_batch`). Finished slides keep their outputs.

    Attributes:
        what: the stage, in logs and errors.
        work: the stage's work on one slide (see `SlideWork`); picklable when `run` uses workers.
        columns: the stage's status columns and their values before the work fills them.
        on_failure: called with a slide that failed, e.g. to remove outputs of an earlier run.
        id_column: the entries' id attribute, the first column of the status CSV: `slide_id`,
            or `image_id` for the image stages, whose entries (`efcm.io.image_manifest`) the
            loop runs the same way.
    """

    what: str
    work: SlideWork
    columns: Mapping[str, Any] = field(default_factory=dict)
    on_failure: Callable[[SlideEntry], None] | None = None
    id_column: str = "slide_id"

    def attempt(self, entry: SlideEntry) -> SlideOutcome:
        """Run the work on one slide; never raises for a slide that fails."""
        t0 = time.perf_counter()
        item = getattr(entry, self.id_column)
        row: dict[str, Any] = {self.id_column: item, "status": OK, "reason": ""}
        row.update(self.columns)
        failed, unexpected = True, None
        try:
            self.work(entry, row)
            failed = False
        except EXPECTED_ERRORS as err:
            status, reason = expected_failure(err, entry.uri)
            row.update(status=status, reason=reason)
            log.warning("%s: %s: %s", self.what, item, reason)
        except Exception as err:  # recorded in the slide's row and counted by `run`
            row.update(status=ERROR, reason=f"{type(err).__name__}: {err}")
            log.exception("%s: %s: unexpected error", self.what, item)
            unexpected = type(err).__name__
        if failed and self.on_failure is not None:
            self.on_failure(entry)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        return SlideOutcome(row, unexpected)

    def run(
        self, entries: Sequence[SlideEntry], status_path: Path, *, workers: int = 1
    ) -> list[dict[str, Any]]:
        """Attempt every slide (in `workers` processes when > 1), write the status CSV, and raise
        when unexpected errors hit most slides.

        Returns:
            The status rows, in the order of `entries`.

        Raises:
            BatchFailed: an unexpected exception on more than half of the attempted slides.
        """
        outcomes = self._attempt_all(entries, workers)
        rows = [o.row for o in outcomes]
        write_status(status_path, rows, self.id_column)
        attempted = [o for o in outcomes if o.row["reason"] != ALREADY_DONE]
        hit = [o for o in attempted if o.unexpected]
        unit = self.id_column.removesuffix("_id")
        if 2 * len(hit) > len(attempted):
            raise BatchFailed(
                f"{self.what}: an unexpected error on {len(hit)} of {len(attempted)} attempted "
                f"{unit}s ({_unexpected_summary(hit, self.id_column)}): a bug, not bad {unit}s; "
                f"the tracebacks are in the log, every {unit}'s row in {status_path}"
            )
        return rows

    def _attempt_all(self, entries: Sequence[SlideEntry], workers: int) -> list[SlideOutcome]:
        unit = self.id_column.removesuffix("_id")
        bar = tqdm(total=len(entries), desc=self.what, unit=unit, disable=None)
        outcomes = []
        if workers > 1 and len(entries) > 1:
            with ProcessPoolExecutor(workers) as pool:
                for fut in [pool.submit(self.attempt, e) for e in entries]:
                    outcomes.append(fut.result())
                    bar.update()
        else:
            for e in entries:
                outcomes.append(self.attempt(e))
                bar.update()
        bar.close()
        return outcomes


def check_batch(
    rows: list[dict[str, Any]], what: str, fail_on: str = "all", id_column: str = "slide_id"
) -> list[dict[str, Any]]:
    """Raise BatchFailed when `fail_on` says so: `all` slides failed (default), `any` failed, or
    `never`. Failed slides are in the status CSV either way. `id_column`: as in `SlideLoop`."""
    unit = id_column.removesuffix("_id")
    failed = [r for r in rows if r["status"] != OK]
    log.info("%s: %d/%d %ss ok", what, len(rows) - len(failed), len(rows), unit)
    for r in failed:
        log.warning("%s: %s %s: %s", what, r[id_column], r["status"], r["reason"])
    if failed and (fail_on == "any" or (fail_on == "all" and len(failed) == len(rows))):
        reasons = "; ".join(f"{r[id_column]}: {r['reason']}" for r in failed[:3])
        which = f"every {unit}" if len(failed) == len(rows) else f"{len(failed)} {unit}(s)"
        raise BatchFailed(f"{what}: {which} failed ({reasons})")
    return rows


# -- the patch stage ------------------------------------------------------------------------------

_PATCH_COLUMNS = {"mpp": "", "mpp_source": "", "patch_level": "", "n_patches": 0}


def _remove_stale_coords(out_dir: Path, entry: SlideEntry) -> None:
    """Delete the coords h5 an earlier run left for a slide that failed now: made with other
    settings (or from an older slide file), it would be extracted as if it were current."""
    path = out_dir / "patches" / f"{entry.slide_id}.h5"
    if path.exists():
        path.unlink()
        log.info("%s: removed %s, left by an earlier run", entry.slide_id, path)


def _patch(
    entry: SlideEntry,
    row: dict[str, Any],
    base_dir: Path,
    out_dir: Path,
    params: PatchParams,
    cache: SlideCache | None = None,
) -> None:
    """Segment and patch one slide (a `SlideWork`): coords h5, QC PNG and GeoJSON; a gs://
    slide is staged into `cache`."""
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


def _patch_or_reuse(
    entry: SlideEntry,
    row: dict[str, Any],
    base_dir: Path,
    out_dir: Path,
    params: PatchParams,
    overwrite: bool,
    cache: SlideCache | None = None,
) -> None:
    """`_patch`, unless the slide's coords h5 can be reused as it is (see `_reused_row`)."""
    done = None if overwrite else _reused_row(entry, out_dir, params)
    if done is None:
        _patch(entry, row, base_dir, out_dir, params, cache)
    else:
        row.update(done)


def _patch_loop(
    base_dir: Path,
    out_dir: Path,
    params: PatchParams,
    overwrite: bool,
    cache: SlideCache | None = None,
) -> SlideLoop:
    work = partial(
        _patch_or_reuse,
        base_dir=base_dir,
        out_dir=out_dir,
        params=params,
        overwrite=overwrite,
        cache=cache,
    )
    return SlideLoop("patch", work, _PATCH_COLUMNS, partial(_remove_stale_coords, out_dir))


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
    return _patch_loop(base_dir, out_dir, params, overwrite=True, cache=cache).attempt(entry).row


def _reused_row(entry: SlideEntry, out_dir: Path, params: PatchParams) -> dict[str, Any] | None:
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
            "status": OK if len(d) else NO_TISSUE,
            "reason": ALREADY_DONE,
            "mpp": f"{float(d.attrs['mpp']):.5g}",
            "mpp_source": str(d.attrs["mpp_source"]),
            "patch_level": int(d.attrs["patch_level"]),
            "n_patches": len(d),
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
    """Patch every slide of the manifest into out_dir/patches, out_dir/qc and out_dir/status.csv.

    Raises:
        BatchFailed: an unexpected error hit most slides (see `SlideLoop`).
    """
    out = Path(out_dir)
    (out / "patches").mkdir(parents=True, exist_ok=True)
    for folder in (out / "patches", out / "qc"):
        if folder.is_dir() and (n := remove_stale_parts(folder)):
            log.info("removed %d half-written file(s) of an interrupted run in %s", n, folder)
    loop = _patch_loop(manifest.base_dir, out, params, overwrite, cache)
    return loop.run(manifest.slides, out / "status.csv", workers=workers)
