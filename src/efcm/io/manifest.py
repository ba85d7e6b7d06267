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


def read_manifest(path: str | Path, classes: tuple[str, ...] | None = None) -> Manifest:
    """Read and check a manifest.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column, an empty or duplicate slide_id, a non-empty label not in
            `classes`, or a bad mpp, each naming the row. An empty label is valid (unlabelled).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; need {list(REQUIRED)} (+ optional mpp)"
            )
        rows = list(reader)
    slides, seen = [], set()
    for i, row in enumerate(rows, start=2):
        sid = (row["slide_id"] or "").strip()
        if not _ID.match(sid):
            raise ValueError(
                f"{path}:{i}: slide_id {sid!r} must be letters, digits, '.', '_' or '-'"
            )
        if sid in seen:
            raise ValueError(f"{path}:{i}: duplicate slide_id {sid!r}")
        seen.add(sid)
        label = (row["label"] or "").strip()
        if classes is not None and label and label not in classes:
            raise ValueError(
                f"{path}:{i}: label {label!r} of {sid} is not one of {list(classes)} "
                "(leave it empty for an unlabelled slide)"
            )
        raw = (row.get("mpp") or "").strip()
        mpp = _parse_mpp(raw, f"{path}:{i}", sid) if raw else None
        case = (row["case_id"] or "").strip() or sid
        slides.append(SlideEntry(sid, case, (row["uri"] or "").strip(), label, mpp))
    if not slides:
        raise ValueError(f"{path}: no slides")
    return Manifest(path, tuple(slides))


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
    import os
    import posixpath

    from efcm.io.gcs import is_gcs, split_gcs

    src = str(uri)
    manifest = read_manifest(local_path(src, cache=cache), classes)
    if is_gcs(src):
        bucket, blob = split_gcs(src)
        base = posixpath.dirname(blob)
    else:
        base = os.path.dirname(os.path.abspath(os.path.expanduser(src)))
    slides = []
    for s in manifest.slides:
        target = s.uri
        if "://" not in s.uri and not os.path.isabs(os.path.expanduser(s.uri)):
            if is_gcs(src):
                rel = posixpath.normpath(posixpath.join(base, s.uri))
                if rel == ".." or rel.startswith("../"):
                    raise ValueError(f"{src}: uri {s.uri!r} of {s.slide_id} leaves bucket {bucket}")
                target = f"gs://{bucket}/{rel}"
            else:
                target = os.path.normpath(os.path.join(base, os.path.expanduser(s.uri)))
        slides.append(SlideEntry(s.slide_id, s.case_id, target, s.label, s.mpp))
    return write_manifest(dest, slides)


def write_manifest(dest: str | Path, slides: Iterable[SlideEntry]) -> Manifest:
    """Write `slides` as a manifest CSV at `dest` (atomically); returns it."""
    import os

    from efcm.io.files import atomic_path

    slides = tuple(slides)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(dest)
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*REQUIRED, "mpp"])
        for s in slides:
            writer.writerow([s.slide_id, s.case_id, s.uri, s.label, "" if s.mpp is None else s.mpp])
    os.replace(tmp, dest)
    return Manifest(dest, slides)


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
