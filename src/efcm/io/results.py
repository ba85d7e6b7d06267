"""The files a slide-level or image-level strategy writes, and their readers: predictions.csv
(out-of-fold predictions), attention.h5 (slides), val_predictions.csv (images: each fold's
validation predictions, where multi-label thresholds are picked), summary.json and folds.csv.
Evaluation, export and the report read them; training writes them."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from efcm.io.files import atomic_path

#: An image strategy's predictions of each fold on its own validation images (the layout of
#: predictions.csv): evaluation picks a multi-label task's thresholds there, not on test images.
VAL_PREDICTIONS = "val_predictions.csv"


def write_predictions(
    out_dir: Path,
    rows: list[dict[str, Any]],
    attention: dict[str, np.ndarray] | None = None,
    *,
    name: str = "predictions.csv",
    fields: list[str] | None = None,
) -> None:
    """out_dir/predictions.csv (the out-of-fold predictions; another file `name`) and
    out_dir/attention.h5 (one dataset per test slide, aligned with its features' coords),
    atomically. `fields`: the columns (default: the first row's keys; give them for no rows)."""
    import h5py

    pred = out_dir / name
    tmp = atomic_path(pred)
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, pred)
    if attention:
        path = out_dir / "attention.h5"
        tmp = atomic_path(path)
        with h5py.File(tmp, "w") as f:
            for sid, a in attention.items():
                f.create_dataset(sid, data=a)
        os.replace(tmp, path)


def read_predictions(
    path: str | Path, classes: tuple[str, ...], *, multi_label: bool = False
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(probs (N, C), labels, ids) from a predictions.csv: a slide strategy's (`slide_id`) or an
    image strategy's (`image_id`). labels: (N,) class indices from `label`, or with
    `multi_label` (N, C) 0/1 from the `label_<class>` columns (the multi-hot label)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    wanted = [f"prob_{c}" for c in classes]
    wanted += [f"label_{c}" for c in classes] if multi_label else []
    missing = [k for k in wanted if rows and k not in rows[0]]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows], np.float32)
    if multi_label:
        labels = np.array([[int(r[f"label_{c}"]) for c in classes] for r in rows], np.int64)
        labels = labels.reshape(len(rows), len(classes))
    else:
        labels = np.array([int(r["label"]) for r in rows], np.int64)
    key = "image_id" if rows and "image_id" in rows[0] else "slide_id"
    return probs.reshape(len(rows), len(classes)), labels, [r[key] for r in rows]


def read_attention(path: str | Path) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        return {k: np.asarray(v[:], np.float32) for k, v in f.items()}


def read_summary(mil_dir: str | Path) -> dict[str, Any]:
    """summary.json of a train-mil or strategy output dir."""
    return json.loads((Path(mil_dir) / "summary.json").read_text())


def read_folds(path: str | Path) -> np.ndarray:
    """(N,) the fold of each row of a predictions.csv (in file order)."""
    with open(path, newline="") as f:
        return np.array([int(r["fold"]) for r in csv.DictReader(f)], np.int64)
