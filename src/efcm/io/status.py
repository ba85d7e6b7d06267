"""Per-slide (and per-image) status CSVs: one row per slide (`ok`, `no_tissue`, `unreadable`,
...) with the reason."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from efcm.io.files import atomic_path

OK = "ok"
NO_TISSUE = "no_tissue"


def write_status(path: Path, rows: list[dict[str, Any]], id_column: str = "slide_id") -> None:
    """Write the status CSV atomically; columns are the union of the rows' keys, the id
    (`slide_id`, or `image_id` for images) first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = [id_column, "status", "reason"]
    for r in rows:
        fields += [k for k in r if k not in fields]
    tmp = atomic_path(path)
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def read_status(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def ok_slides(path: Path) -> set[str]:
    return {r["slide_id"] for r in read_status(path) if r["status"] == OK}
