"""The slide manifest: a CSV with `slide_id, case_id, uri, label` and an optional `mpp` override.

`case_id` groups the slides of one patient (splits never separate them). Relative URIs are taken
from the manifest's own folder, so a dataset directory can be moved or versioned as a whole.

An empty `label` marks an unlabelled slide: patching, extraction and distillation use it like any
other, while splits, MIL training and evaluation leave it out (`Manifest.labels`) and say how many
they left out. A non-empty label must be one of the classes.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from efcm.io.cache import SlideCache, local_path

REQUIRED = ("slide_id", "case_id", "uri", "label")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SlideEntry:
    slide_id: str
    case_id: str
    uri: str
    label: str  # "" = unlabelled
    mpp: float | None = None

    @property
    def labelled(self) -> bool:
        return bool(self.label)


@dataclass(frozen=True)
class Manifest:
    path: Path
    slides: tuple[SlideEntry, ...]

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def unlabelled(self) -> list[str]:
        """The slide_ids with an empty label, in manifest order."""
        return [s.slide_id for s in self.slides if not s.labelled]

    def labels(self, classes: tuple[str, ...]) -> dict[str, int]:
        """slide_id -> class index (the order of `classes`), for the labelled slides only.

        Raises:
            ValueError: a label that is not one of `classes`, naming the slide.
        """
        out = {}
        for s in self.slides:
            if not s.labelled:
                continue
            if s.label not in classes:
                raise ValueError(
                    f"{self.path}: label {s.label!r} of {s.slide_id} is not one of {list(classes)}"
                )
            out[s.slide_id] = classes.index(s.label)
        return out


def _parse_mpp(raw: str, where: str, sid: str) -> float:
    try:
        mpp = float(raw)
    except ValueError:
        raise ValueError(f"{where}: mpp {raw!r} of {sid} is not a number") from None
    if not mpp > 0:
        raise ValueError(f"{where}: mpp of {sid} must be > 0, got {mpp}")
    return mpp


@dataclass(frozen=True)
class ManifestRow:
    """One checked row of a manifest CSV (slides or images): its id, case, URI and label as
    written, the other cells, and where it is (`path:line`, for error messages)."""

    where: str
    item_id: str
    case_id: str  # the item's id when the cell is empty
    uri: str
    label: str
    cells: dict[str, str]


def read_rows(
    path: str | Path, id_column: str, what: str, optional: tuple[str, ...] = ()
) -> list[ManifestRow]:
    """The rows of a manifest CSV with the columns `id_column, case_id, uri, label` (+ `optional`),
    ids checked: the part every manifest shares (slides: `read_manifest`, images:
    `efcm.io.image_manifest`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column, an empty, malformed or duplicate id (naming the row), or no
            rows at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    required = (id_column, "case_id", "uri", "label")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            extra = f" (+ optional {', '.join(optional)})" if optional else ""
            raise ValueError(f"{path}: missing column(s) {missing}; need {list(required)}{extra}")
        rows = list(reader)
    out, seen = [], set()
    for i, row in enumerate(rows, start=2):
        cells = {k: (v or "").strip() for k, v in row.items() if k is not None}
        item = cells[id_column]
        if not _ID.match(item):
            raise ValueError(
                f"{path}:{i}: {id_column} {item!r} must be letters, digits, '.', '_' or '-'"
            )
        if item in seen:
            raise ValueError(f"{path}:{i}: duplicate {id_column} {item!r}")
        seen.add(item)
        case = cells["case_id"] or item
        out.append(ManifestRow(f"{path}:{i}", item, case, cells["uri"], cells["label"], cells))
    if not out:
        raise ValueError(f"{path}: no {what}s")
    return out


def read_manifest(path: str | Path, classes: tuple[str, ...] | None = None) -> Manifest:
    """Read and check a manifest.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column, an empty or duplicate slide_id, a non-empty label not in
            `classes`, or a bad mpp, each naming the row. An empty label is valid (unlabelled).
    """
    slides = []
    for r in read_rows(path, "slide_id", "slide", optional=("mpp",)):
        if classes is not None and r.label and r.label not in classes:
            raise ValueError(
                f"{r.where}: label {r.label!r} of {r.item_id} is not one of {list(classes)} "
                "(leave it empty for an unlabelled slide)"
            )
        raw = r.cells.get("mpp", "")
        mpp = _parse_mpp(raw, r.where, r.item_id) if raw else None
        slides.append(SlideEntry(r.item_id, r.case_id, r.uri, r.label, mpp))
    return Manifest(Path(path), tuple(slides))


def absolute_uri(manifest_uri: str, uri: str, item_id: str) -> str:
    """`uri` of a row of the manifest at `manifest_uri` (a local path or gs:// URI), made
    absolute: a relative URI is taken from the manifest's folder (``slides/a.svs`` next to
    ``gs://bkt/ds/manifest.csv`` becomes ``gs://bkt/ds/slides/a.svs``); an absolute path or a URI
    with a scheme is kept.

    Raises:
        ValueError: a relative URI that climbs out of the manifest's bucket.
    """
    import os
    import posixpath

    from efcm.io.gcs import is_gcs, split_gcs

    if "://" in uri or os.path.isabs(os.path.expanduser(uri)):
        return uri
    if is_gcs(manifest_uri):
        bucket, blob = split_gcs(manifest_uri)
        rel = posixpath.normpath(posixpath.join(posixpath.dirname(blob), uri))
        if rel == ".." or rel.startswith("../"):
            raise ValueError(f"{manifest_uri}: uri {uri!r} of {item_id} leaves bucket {bucket}")
        return f"gs://{bucket}/{rel}"
    base = os.path.dirname(os.path.abspath(os.path.expanduser(manifest_uri)))
    return os.path.normpath(os.path.join(base, os.path.expanduser(uri)))


def write_rows(dest: str | Path, header: Iterable[str], rows: Iterable[Iterable[Any]]) -> Path:
    """Write a manifest CSV at `dest` atomically; returns its path."""
    import os

    from efcm.io.files import atomic_path

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(dest)
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(header))
        writer.writerows(rows)
    os.replace(tmp, dest)
    return dest


def import_manifest(
    uri: str | Path,
    dest: str | Path,
    classes: tuple[str, ...] | None = None,
    *,
    cache: SlideCache | None = None,
) -> Manifest:
    """Copy a manifest (local path, or gs:// URI staged into `cache`) to `dest`, checked, with every
    slide URI absolute.

    A relative slide URI is taken from the source manifest's folder (``slides/a.svs`` next to
    ``gs://bkt/ds/manifest.csv`` becomes ``gs://bkt/ds/slides/a.svs``), so the copy works from any
    folder, e.g. as a pipeline artifact. The slides themselves are referenced, never copied.

    Raises:
        FileNotFoundError: no such manifest.
        ValueError: the manifest is invalid (see `read_manifest`), or a relative URI climbs out of
            the bucket.
    """
    src = str(uri)
    manifest = read_manifest(local_path(src, cache=cache), classes)
    slides = [
        SlideEntry(s.slide_id, s.case_id, absolute_uri(src, s.uri, s.slide_id), s.label, s.mpp)
        for s in manifest.slides
    ]
    return write_manifest(dest, slides)


def write_manifest(dest: str | Path, slides: Iterable[SlideEntry]) -> Manifest:
    """Write `slides` as a manifest CSV at `dest` (atomically); returns it."""
    slides = tuple(slides)
    rows = ((s.slide_id, s.case_id, s.uri, s.label, "" if s.mpp is None else s.mpp) for s in slides)
    return Manifest(write_rows(dest, [*REQUIRED, "mpp"], rows), slides)


def apply_mpp_overrides(manifest: Manifest, path: str | Path) -> Manifest:
    """Apply an override CSV (`slide_id, mpp`): its mpp wins over the manifest's column and over
    the slide's own metadata (recorded as source `override`).

    Raises:
        ValueError: a missing column, a bad mpp, or a slide_id that is not in the manifest.
    """
    from dataclasses import replace

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mpp override CSV not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"slide_id", "mpp"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: needs the columns slide_id, mpp")
        rows = list(reader)
    known = {s.slide_id for s in manifest.slides}
    overrides: dict[str, float] = {}
    for i, row in enumerate(rows, start=2):
        sid, raw = (row["slide_id"] or "").strip(), (row["mpp"] or "").strip()
        if sid not in known:
            raise ValueError(f"{path}:{i}: slide_id {sid!r} is not in the manifest {manifest.path}")
        overrides[sid] = _parse_mpp(raw, f"{path}:{i}", sid)
    slides = tuple(replace(s, mpp=overrides.get(s.slide_id, s.mpp)) for s in manifest.slides)
    return Manifest(manifest.path, slides)
