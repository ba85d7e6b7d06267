"""The evaluation stage: teacher baseline vs student on the same out-of-fold slides, one table.

Writes `metrics.json` (nested by model name, so DVC shows `teacher.auc`, `student.auc_ci_low`,
...), `roc/<model>.csv` for `dvc plots`, `efficiency.json` (teacher vs student cost, measured in
this run), and `report.md`: a Markdown table with every metric and its CI, and the cost table.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from efcm.config import Params
from efcm.efficiency import compare, markdown_table
from efcm.manifest import Manifest
from efcm.metrics import (
    METRICS,
    classification_metrics,
    confusion,
    localisation_auroc,
    mean_localisation_auroc,
    roc_points,
)
from efcm.mil import read_folds, read_predictions, save_json
from efcm.storage import atomic_path

log = logging.getLogger(__name__)


def _check_same_slides(preds: dict[str, tuple[np.ndarray, np.ndarray, list[str]]]) -> None:
    ref_name, (_, _, ref) = next(iter(preds.items()))
    for name, (_, _, ids) in preds.items():
        if sorted(ids) != sorted(ref):
            raise ValueError(
                f"models {ref_name!r} and {name!r} were tested on different slides: "
                "train them on the same splits"
            )


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def localisation(
    mil_dir: Path, manifest: Manifest, patches_dir: Path, masks_dir: Path
) -> float | None:
    """Mean over the test slides with a ground-truth tumour mask (masks_dir/<slide_id>.png, any
    resolution) of the AUROC of the CLAM attention against "patch is tumour"; None without
    attention or masks."""
    import cv2

    from efcm.mil import read_attention
    from efcm.slides.patching import read_coords
    from efcm.slides.reader import open_slide

    if not (mil_dir / "attention.h5").is_file():
        return None
    by_id = {s.slide_id: s for s in manifest.slides}
    aurocs = {}
    for sid, attention in read_attention(mil_dir / "attention.h5").items():
        mask_path = masks_dir / f"{sid}.png"
        if sid not in by_id or not mask_path.is_file():
            continue
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        cf = read_coords(patches_dir / "patches" / f"{sid}.h5")
        with open_slide(by_id[sid].uri, base_dir=manifest.base_dir) as slide:
            downsample = slide.dimensions[0] / mask.shape[1]
        aurocs[sid] = localisation_auroc(attention, cf.coords, cf.size0, mask, downsample)
    return mean_localisation_auroc(aurocs) if aurocs else None


def evaluate(
    predictions: dict[str, str | Path],
    out_dir: str | Path,
    params: Params,
    efficiency: dict[str, Any] | None = None,
    localisation: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """Compare models given as {name: predictions.csv}; returns the metrics written to
    metrics.json."""
    classes = tuple(params.dataset.classes)
    out = Path(out_dir)
    (out / "roc").mkdir(parents=True, exist_ok=True)
    preds = {name: read_predictions(p, classes) for name, p in predictions.items()}
    _check_same_slides(preds)
    metrics: dict[str, Any] = {}
    for name, (probs, labels, _) in preds.items():
        m = classification_metrics(
            probs,
            labels,
            len(classes),
            n_bootstrap=params.evaluate.bootstrap,
            ci=params.evaluate.ci,
            seed=params.seed,
        )
        folds = read_folds(predictions[name])
        per_fold = [
            classification_metrics(
                probs[folds == f], labels[folds == f], len(classes), n_bootstrap=0
            )
            for f in np.unique(folds)
        ]
        for k in METRICS:  # the mean over folds, next to the pooled out-of-fold estimate
            values = [pf[k] for pf in per_fold if not np.isnan(pf[k])]
            m[f"{k}_fold_mean"] = float(np.mean(values)) if values else float("nan")
        role = "teacher" if name == "teacher" else "student" if name.startswith("student") else None
        if efficiency and role in efficiency:
            e = efficiency[role]
            m.update(
                params=e["params"],
                gflops_per_patch=e["gflops_per_patch"],
                patches_per_s=e["patches_per_s"],
            )
        if localisation and localisation.get(name) is not None:
            m["localisation_auroc"] = localisation[name]
        metrics[name] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()}
        _write_csv(
            out / "roc" / f"{name}.csv",
            ["fpr", "tpr", "threshold"],
            roc_points(probs, labels, positive=len(classes) - 1),
        )
        _write_csv(
            out / "confusion" / f"{name}.csv",
            ["actual", "predicted"],
            [
                {"actual": classes[a], "predicted": classes[p]}
                for a, p in zip(labels, probs.argmax(1), strict=True)
            ],
        )
        m_conf = confusion(probs, labels, len(classes))
        metrics[name]["confusion"] = m_conf
    if efficiency:
        metrics["efficiency"] = {
            k: efficiency[k]
            for k in ("student_teacher_speedup", "param_ratio", "flop_ratio")
            if k in efficiency
        }
    save_json(out / "metrics.json", metrics)
    text = report(metrics, params)
    if efficiency:
        save_json(out / "efficiency.json", efficiency)
        text += "\n## Cost per patch (teacher vs student, one run, this machine)\n\n"
        text += markdown_table(efficiency) + "\n"
    (out / "report.md").write_text(text)
    return metrics


def classification_curves(
    eval_dir: str | Path, row: str
) -> tuple[tuple[list[float], list[float], list[float]] | None, list[list[int]] | None]:
    """(fpr, tpr, thresholds) of `roc/<row>.csv` and the confusion matrix of `row` in
    metrics.json, as written by `evaluate`; None for what the row does not have (a skipped
    strategy). Thresholds above 1 (sklearn's `inf` first point) are clipped to 1."""
    out = Path(eval_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    confusion = metrics.get(row, {}).get("confusion")
    roc_path = out / "roc" / f"{row}.csv"
    if not roc_path.is_file():
        return None, confusion
    with open(roc_path, newline="") as f:
        points = [
            (float(r["fpr"]), float(r["tpr"]), float(r["threshold"])) for r in csv.DictReader(f)
        ]
    fpr, tpr, thr = (list(v) for v in zip(*points, strict=True)) if points else ([], [], [])
    return (fpr, tpr, [min(t, 1.0) for t in thr]), confusion


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """`{"teacher": {"auc": ...}}` -> `{"teacher.auc": ...}`: finite numbers only (a NaN AUC of a
    one-class evaluation is left out; metrics.json keeps it)."""
    flat = {}
    for model, values in metrics.items():
        for k, v in values.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v):
                flat[f"{model}.{k}"] = float(v)
    return flat


def report(metrics: dict[str, Any], params: Params) -> str:
    ci = round(params.evaluate.ci * 100)
    head = ["model", "slides", "params", "GFLOPs/patch", "patches/s"]
    head += [f"{m} ({ci}% CI)" for m in METRICS] + ["attention localisation AUROC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in metrics.items():
        if name == "efficiency":
            continue
        cells = [
            name,
            str(m["n"]),
            f"{m.get('params', float('nan')):,}" if "params" in m else "-",
            f"{m['gflops_per_patch']:.3f}" if "gflops_per_patch" in m else "-",
            f"{m['patches_per_s']:.1f}" if "patches_per_s" in m else "-",
        ]
        cells += [f"{m[k]:.3f} [{m[k + '_ci_low']:.3f}, {m[k + '_ci_high']:.3f}]" for k in METRICS]
        loc = m.get("localisation_auroc")
        cells.append("-" if loc is None else f"{loc:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return (
        "# EFCM evaluation\n\nSlide-level metrics of the out-of-fold predictions pooled over the "
        "folds (the same patient-level folds for every row), with bootstrap CIs; metrics.json also "
        "has each metric's mean over folds (`<metric>_fold_mean`) and the confusion matrix.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def measure_efficiency(
    params: Params,
    student_ckpt: str | Path,
    batch_size: int | None = None,
    min_seconds: float = 1.0,
) -> dict[str, Any]:
    """Teacher vs the distilled student, in one run on this machine's default device, at the
    extraction batch size (`extract.batch_size`) unless given."""
    import torch

    from efcm.distill import load_student
    from efcm.models.encoders import build_backbone

    teacher, _ = build_backbone(params.teacher, warn_random=False)
    student, spec = load_student(student_ckpt)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return compare(
        teacher.to(dev),
        params.teacher.input_size,
        student.to(dev),
        spec.input_size,
        batch_size or params.extract.batch_size,
        min_seconds=min_seconds,
    )


def prediction_curves(
    mil_dir: Path, classes: list[str] | tuple[str, ...]
) -> tuple[tuple[list[float], list[float], list[float]], list[list[int]]]:
    """The out-of-fold ROC (the last class against the rest: fpr, tpr, thresholds clipped to 1)
    and confusion matrix of a train-mil or strategy output's predictions.csv, as the Kubeflow
    UI's ClassificationMetrics take them."""
    probs, labels, _ = read_predictions(mil_dir / "predictions.csv", tuple(classes))
    points = roc_points(probs, labels, positive=len(classes) - 1)
    fpr = [p["fpr"] for p in points]
    tpr = [p["tpr"] for p in points]
    thr = [min(p["threshold"], 1.0) for p in points]
    return (fpr, tpr, thr), confusion(probs, labels, len(classes))
