"""The slide manifest: a CSV with `slide_id, case_id, uri, label` and an optional `mpp` override.

`case_id` groups the slides of one patient (splits never separate them). Relative URIs are taken
from the manifest's own folder, so a dataset directory can be moved or versioned as a whole.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

REQUIRED = ("slide_id", "case_id", "uri", "label")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SlideEntry:
    slide_id: str
    case_id: str
    uri: str
    label: str
    mpp: float | None = None


@dataclass(frozen=True)
class Manifest:
    path: Path
    slides: tuple[SlideEntry, ...]

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def labels(self, classes: tuple[str, ...]) -> dict[str, int]:
        """slide_id -> class index (the order of `classes`)."""
        return {s.slide_id: classes.index(s.label) for s in self.slides}


def read_manifest(path: str | Path, classes: tuple[str, ...] | None = None) -> Manifest:
    """Read and check a manifest.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a missing column, an empty or duplicate slide_id, a label not in `classes`,
            or a bad mpp, each naming the row.
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
        if classes is not None and label not in classes:
            raise ValueError(f"{path}:{i}: label {label!r} of {sid} is not one of {list(classes)}")
        mpp = None
        raw = (row.get("mpp") or "").strip()
        if raw:
            try:
                mpp = float(raw)
            except ValueError:
                raise ValueError(f"{path}:{i}: mpp {raw!r} of {sid} is not a number") from None
            if mpp <= 0:
                raise ValueError(f"{path}:{i}: mpp of {sid} must be > 0, got {mpp}")
        case = (row["case_id"] or "").strip() or sid
        slides.append(SlideEntry(sid, case, (row["uri"] or "").strip(), label, mpp))
    if not slides:
        raise ValueError(f"{path}: no slides")
    return Manifest(path, tuple(slides))
