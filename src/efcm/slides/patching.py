"""Patch grids at a target mpp, and the coords h5 files (CLAM's layout plus our attributes).

Patch size and step are given in px at `target_mpp`; the grid lives in level-0 px. A patch is read
at
the best pyramid level not coarser than the target (`patch_level`, `read_size` px there) and resized
to `patch_size`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from efcm.config import PatchParams
from efcm.errors import InvalidInput
from efcm.io.files import atomic_path
from efcm.slides.tissue import TissueMask

log = logging.getLogger(__name__)

# The coords dataset's attribute that holds the settings which made the grid (a JSON object).
SETTINGS_ATTR = "efcm_patch_settings"
# PatchParams keys that do not change a slide's outputs (a batch policy, not a grid setting)
_NOT_OUTPUT_KEYS = frozenset({"fail_on"})


@dataclass(frozen=True)
class PatchGeometry:
    """How a patch maps onto the slide."""

    patch_size: int  # px at target_mpp (what the encoder's transform receives)
    target_mpp: float
    mpp: float  # slide level-0 mpp
    mpp_source: str
    size0: int  # patch side in level-0 px
    step0: int  # grid step in level-0 px
    patch_level: int
    downsample: float  # of patch_level
    read_size: int  # patch side in px at patch_level
    level_dim: tuple[int, int]  # (w, h) of patch_level
    dimensions: tuple[int, int]  # level-0 (w, h)


def geometry(
    level_downsamples: list[float],
    level_dimensions: list[tuple[int, int]],
    mpp: float,
    mpp_source: str,
    params: PatchParams,
) -> PatchGeometry:
    factor = params.target_mpp / mpp  # level-0 px per target px
    size0 = max(1, round(params.patch_size * factor))
    step0 = max(1, round(params.step * factor))
    ds = np.asarray(level_downsamples)
    ok = np.nonzero(ds <= factor * 1.01)[0]
    level = int(ok[np.argmax(ds[ok])]) if len(ok) else 0
    read_size = max(1, round(size0 / ds[level]))
    return PatchGeometry(
        params.patch_size,
        params.target_mpp,
        mpp,
        mpp_source,
        size0,
        step0,
        level,
        float(ds[level]),
        read_size,
        tuple(level_dimensions[level]),
        tuple(level_dimensions[0]),
    )


def patch_coords(mask: TissueMask, geom: PatchGeometry, params: PatchParams) -> np.ndarray:
    """Level-0 top-left (x, y) of every patch kept by the containment test and tissue fraction.

    Returns:
        (N, 2) int64, row-major order (y then x).
    """
    w0, h0 = geom.dimensions
    if not mask.contours or w0 < geom.size0 or h0 < geom.size0:
        return np.zeros((0, 2), np.int64)
    xs = np.arange(0, w0 - geom.size0 + 1, geom.step0)
    ys = np.arange(0, h0 - geom.size0 + 1, geom.step0)
    gx, gy = np.meshgrid(xs, ys)
    gx, gy = gx.ravel(), gy.ravel()
    sx, sy = mask.scale
    contour, holes = mask.contour_raster, mask.hole_raster
    h, w = contour.shape

    def sample(m: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        ix = np.clip((px / sx).astype(np.int64), 0, w - 1)
        iy = np.clip((py / sy).astype(np.int64), 0, h - 1)
        return m[iy, ix].astype(bool)

    cx, cy = gx + geom.size0 / 2, gy + geom.size0 / 2
    if params.contour_fn == "center":
        keep = sample(contour, cx, cy)
    else:  # CLAM's four_pt: points half-way between the centre and the corners
        shift = geom.size0 / 4
        pts = [
            sample(contour, cx + dx, cy + dy) for dx in (-shift, shift) for dy in (-shift, shift)
        ]
        keep = (
            np.logical_or.reduce(pts)
            if params.contour_fn == "four_pt"
            else np.logical_and.reduce(pts)
        )
    keep &= ~sample(holes, cx, cy)
    if params.min_tissue_fraction > 0 and keep.any():
        # int32 counts are exact below 2**31 px (a 4096 px thumbnail has 2**24), at half int64's
        # time and memory on a big slide's thumbnail
        dt = np.int32 if mask.raster.size < 2**31 else np.int64
        raster = np.pad(mask.raster.astype(dt), ((1, 0), (1, 0)))
        integral = raster.cumsum(0, dtype=dt).cumsum(1, dtype=dt)
        x0 = np.clip(np.round(gx / sx).astype(np.int64), 0, w)
        y0 = np.clip(np.round(gy / sy).astype(np.int64), 0, h)
        x1 = np.clip(np.round((gx + geom.size0) / sx).astype(np.int64), 0, w)
        y1 = np.clip(np.round((gy + geom.size0) / sy).astype(np.int64), 0, h)
        area = np.maximum((x1 - x0) * (y1 - y0), 1)
        tissue = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        keep &= tissue / area >= params.min_tissue_fraction
    return np.stack([gx[keep], gy[keep]], 1).astype(np.int64)


def patch_settings(params: PatchParams, *, mpp_override: float | None = None) -> dict[str, Any]:
    """The settings that make a slide's patch grid: every PatchParams key but `fail_on`, plus
    `mpp_override`, the slide's mpp when an override (manifest column or override CSV) gave it,
    else None.

    Returns:
        A JSON-plain dict (tuples as lists), equal to what `read_patch_settings` gives back.
    """
    data = params.model_dump(mode="json", exclude=set(_NOT_OUTPUT_KEYS))
    # the rule of `resolve_mpp`: a positive override wins over the slide's metadata
    data["mpp_override"] = float(mpp_override) if mpp_override and mpp_override > 0 else None
    return json.loads(json.dumps(data, sort_keys=True))


def read_patch_settings(path: str | Path) -> dict[str, Any] | None:
    """The patch settings stored in a coords h5 by efcm (see `patch_settings`), or None for a file
    without them (CLAM, TRIDENT, or an efcm older than the attribute).

    Raises:
        ValueError: the file has no coords dataset, or its settings attribute is not a JSON object.
    """
    path = Path(path)
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise InvalidInput(f"{path}: no 'coords' dataset (not a coords h5)")
        raw = f["coords"].attrs.get(SETTINGS_ATTR)
    return parse_settings(raw, f"{path}: attribute {SETTINGS_ATTR}")


def parse_settings(raw: Any, where: str) -> dict[str, Any] | None:
    """A settings attribute (a JSON object, as str or bytes) as a dict; None when absent.

    Raises:
        ValueError: `where` (the file and attribute) is not a JSON object.
    """
    if raw is None:
        return None
    try:
        settings = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except json.JSONDecodeError as err:
        raise InvalidInput(f"{where} is not valid JSON ({err})") from None
    if not isinstance(settings, dict):
        raise InvalidInput(f"{where} is not a JSON object")
    return settings


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_ABSENT = object()


def settings_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Every key (dotted for nested ones, e.g. `tissue.min_area`) whose value differs, as
    `key old -> new` (`absent` where one side lacks the key), sorted by key; empty when equal."""
    old, new = _flatten(stored), _flatten(current)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b:
            show = ["absent" if v is _ABSENT else json.dumps(v) for v in (a, b)]
            changes.append(f"{key} {show[0]} -> {show[1]}")
    return changes


def made_with(
    slide_id: str,
    path: Path,
    what: str,
    read: Callable[[Path], dict[str, Any] | None],
    current: dict[str, Any],
    origin: str,
) -> bool:
    """Whether the output at `path` was made with the `current` settings (`read` gives those it
    stores; `what` names them in the log, `origin` says who writes files without them); logs why
    not, so a rerun says why it redoes a slide. Shared by patch and extract."""
    try:
        stored = read(path)
    except ValueError as err:
        log.info("%s: %s: redoing", slide_id, err)
        return False
    if stored is None:
        log.info(
            "%s: %s has no stored %s settings (written by %s): redoing",
            slide_id,
            path.name,
            what,
            origin,
        )
        return False
    changes = settings_changes(stored, current)
    if changes:
        log.info("%s: %s settings changed (%s): redoing", slide_id, what, "; ".join(changes))
        return False
    return True


def write_coords(
    path: Path,
    coords: np.ndarray,
    geom: PatchGeometry,
    name: str,
    settings: dict[str, Any] | None = None,
) -> None:
    """Write the coords h5 atomically (CLAM attributes + ours); `settings` (see `patch_settings`)
    are stored as JSON in the attribute `efcm_patch_settings`, for reruns and for export."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    with h5py.File(tmp, "w") as f:
        d = f.create_dataset("coords", data=coords.astype(np.int64))
        if settings is not None:
            d.attrs[SETTINGS_ATTR] = json.dumps(settings, sort_keys=True)
        d.attrs.update(
            {
                "patch_size": geom.patch_size,
                "patch_level": geom.patch_level,
                "downsample": np.array([geom.downsample, geom.downsample]),
                "level_dim": np.array(geom.level_dim),
                "name": name,
                "mpp": geom.mpp,
                "mpp_source": geom.mpp_source,
                "read_size": geom.read_size,
                "target_mpp": geom.target_mpp,
                "size0": geom.size0,
                "step0": geom.step0,
                "dimensions": np.array(geom.dimensions),  # level-0 (w, h): no slide to open
            }
        )
    os.replace(tmp, path)


@dataclass(frozen=True)
class CoordsFile:
    """A coords h5, ours or CLAM/TRIDENT's: what the extraction engine needs to read patches."""

    coords: np.ndarray  # (N, 2) int64 level-0 top-left
    patch_level: int
    read_size: int  # px at patch_level
    patch_size: int  # px handed to the transform
    name: str
    step0: int | None = None  # grid step in level-0 px (None: not a regular grid we know of)
    size0: int | None = None  # patch side in level-0 px
    dimensions: tuple[int, int] | None = None  # the slide's level-0 (w, h), where recorded


def grid_step(coords: np.ndarray) -> int | None:
    """The step of a regular patch grid, from the coords alone (for files without `step0`)."""
    steps = [np.diff(np.unique(coords[:, k])) for k in (0, 1)] if len(coords) > 1 else []
    steps = [d[d > 0].min() for d in steps if (d > 0).any()]
    return int(min(steps)) if steps else None


def read_coords(path: str | Path) -> CoordsFile:
    """Read a coords h5: ours, CLAM's or TRIDENT's.

    Without our `read_size`, a file with TRIDENT's `patch_size_level0` is read at level 0 with that
    size (then resized to `patch_size`); a CLAM file is read as CLAM does, `patch_size` px at
    `patch_level`. Either fallback is logged.
    """
    path = Path(path)
    with h5py.File(path, "r") as f:
        if "coords" not in f:
            raise InvalidInput(f"{path}: no 'coords' dataset (not a coords h5)")
        d = f["coords"]
        coords = np.asarray(d[:], dtype=np.int64).reshape(-1, 2)
        a = dict(d.attrs)
    if "patch_size" not in a:
        raise InvalidInput(f"{path}: coords dataset lacks the 'patch_size' attribute")
    patch_size = int(a["patch_size"])
    level = int(a.get("patch_level", 0))
    if "read_size" in a:
        read_size = int(a["read_size"])
    elif "patch_size_level0" in a:
        level, read_size = 0, int(a["patch_size_level0"])
        log.warning(
            "%s: a TRIDENT file: reading %d px at level 0, resized to %d",
            path,
            read_size,
            patch_size,
        )
    else:
        read_size = patch_size
        log.warning(
            "%s: a CLAM file (no efcm attributes): reading %d px at level %d",
            path,
            patch_size,
            level,
        )
    name = a.get("name", path.stem)
    name = name.decode() if isinstance(name, bytes) else str(name)
    step0 = int(a["step0"]) if "step0" in a else grid_step(coords)
    if "size0" in a:
        size0 = int(a["size0"])
    else:  # CLAM: patch_size px at patch_level, whose downsample it records
        ds = np.asarray(a.get("downsample", [1.0])).reshape(-1)
        size0 = round(read_size * float(ds[0])) if level else read_size
    dims = tuple(int(v) for v in a["dimensions"]) if "dimensions" in a else None
    return CoordsFile(coords, level, read_size, patch_size, name, step0, size0, dims)
