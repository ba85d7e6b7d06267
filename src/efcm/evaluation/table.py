"""The evaluation stage: teacher baseline vs student on the same out-of-fold slides, one table.

Writes `metrics.json` (nested by model name, so DVC shows `teacher.auc`, `student.auc_ci_low`,
...), `roc/<model>.csv` for `dvc plots`, `efficiency.json` (teacher vs student cost, measured in
this run), and `report.md`: a Markdown table with every metric and its CI, the paired student minus
teacher table, and the cost table.

Every row's predictions are aligned by slide id before anything is computed, and every row is
resampled with the same seed over the same cases (`case_id` from the manifest), so the intervals of
all rows come from the same patient-level resamples and each `student.*` row carries the paired
bootstrap of student minus teacher (`delta_auc`, `delta_auc_ci_low`, ...; see
`efcm.evaluation.metrics`). An image evaluation with the fine-tuned teacher's row
(`teacher.finetune`) gives the fine-tuned student's row the paired deltas against it too
(`delta_auc_vs_teacher_finetune`, ...); its `delta_*` stay against the teacher's probe.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from efcm.config import Params
from efcm.evaluation.efficiency import PLURAL, compare, markdown_table
from efcm.evaluation.metrics import (
    METRICS,
    bootstrap_scores,
    classification_metrics,
    confusion,
    localisation_auroc,
    mean_localisation_auroc,
    multilabel_scores,
    paired,
    roc_points,
    summarise,
    threshold_by_fold,
)
from efcm.io.cache import SlideCache
from efcm.io.files import atomic_path, save_json
from efcm.io.image_manifest import LabelSpace
from efcm.io.manifest import Manifest
from efcm.io.results import VAL_PREDICTIONS, read_folds, read_predictions
from efcm.registry import (
    TEACHER_FINETUNE_DELTA,
    TEACHER_FINETUNE_ROW,
    TEACHER_ROW,
    fine_tuned_row,
    is_student_row,
)

log = logging.getLogger(__name__)


# (probs (N, C), labels (N,) or (N, C) 0/1, slide or image ids, folds (N,)) of one row, sorted
# by id
Preds = tuple[np.ndarray, np.ndarray, list[str], np.ndarray]


def _read_sorted(path: str | Path, classes: tuple[str, ...], multi_label: bool = False) -> Preds:
    """A predictions.csv sorted by slide id: each row's file has its own order, and the paired
    statistics need slide i to be the same slide in every row."""
    probs, labels, ids = read_predictions(path, classes, multi_label=multi_label)
    folds = read_folds(path)
    repeated = sorted(s for s, n in Counter(ids).items() if n > 1)
    if repeated:
        raise ValueError(f"{path}: slide(s) {repeated[:5]} listed more than once")
    order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
    return probs[order], labels[order], [ids[i] for i in order], folds[order]


def _check_same_slides(preds: dict[str, Preds]) -> None:
    ref_name, (_, ref_labels, ref, _) = next(iter(preds.items()))
    for name, (_, labels, ids, _) in preds.items():
        if sorted(ids) != sorted(ref):
            raise ValueError(
                f"models {ref_name!r} and {name!r} were tested on different slides: "
                "train them on the same splits"
            )
        differ = [s for s, a, b in zip(ids, labels, ref_labels, strict=True) if np.any(a != b)]
        if differ:
            raise ValueError(
                f"models {ref_name!r} and {name!r} disagree on the label of slide(s) "
                f"{differ[:5]}: evaluate predictions made from the same manifest"
            )


def _groups(ids: list[str], cases: Mapping[str, str] | None) -> list[str] | None:
    """The case id of each slide; None (each slide its own case) without `cases`."""
    if cases is None:
        return None
    missing = [s for s in ids if s not in cases]
    if missing:
        raise ValueError(
            f"no case_id for tested slide(s) {missing[:5]} ({len(missing)} in all): "
            "the manifest given to evaluate must list every slide of the predictions"
        )
    return [str(cases[s]) for s in ids]


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def localisation(
    mil_dir: Path,
    manifest: Manifest,
    patches_dir: Path,
    masks_dir: Path,
    cache: SlideCache | None = None,
) -> float | None:
    """Mean over the test slides with a ground-truth tumour mask (masks_dir/<slide_id>.png, any
    resolution) of the AUROC of the CLAM attention against "patch is tumour"; None without
    attention or masks. The slide's level-0 width comes from its coords file, or for a coords
    file without it (CLAM's, an older efcm's) from the slide (gs:// staged into `cache`)."""
    import cv2

    from efcm.io.results import read_attention
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
        if cf.dimensions is not None:  # recorded by `efcm patch`: no slide to open
            downsample = cf.dimensions[0] / mask.shape[1]
        else:
            with open_slide(by_id[sid].uri, base_dir=manifest.base_dir, cache=cache) as slide:
                downsample = slide.dimensions[0] / mask.shape[1]
        aurocs[sid] = localisation_auroc(attention, cf.coords, cf.size0, mask, downsample)
    return mean_localisation_auroc(aurocs) if aurocs else None


def _calls(
    path: Path, probs: np.ndarray, folds: np.ndarray, classes: tuple[str, ...]
) -> tuple[np.ndarray, dict[int, dict[str, Any]]]:
    """A multi-label row's 0/1 calls: per fold, the thresholds of max F1 on that fold's
    validation predictions (`val_predictions.csv` beside `path`), applied to its test rows."""
    val = path.with_name(VAL_PREDICTIONS)
    if not val.is_file():
        raise FileNotFoundError(
            f"{val}: missing; a multi-label task's F1 thresholds are picked on each fold's "
            "validation predictions, which the image strategies write beside predictions.csv"
        )
    val_probs, val_targets, _ = read_predictions(val, classes, multi_label=True)
    return threshold_by_fold(probs, folds, val_probs, val_targets, read_folds(val))


def evaluate(
    predictions: dict[str, str | Path],
    out_dir: str | Path,
    params: Params,
    efficiency: dict[str, Any] | None = None,
    localisation: dict[str, float | None] | None = None,
    cases: Mapping[str, str] | None = None,
    left_out: Mapping[str, str] | None = None,
    *,
    space: LabelSpace | None = None,
) -> dict[str, Any]:
    """Compare models given as {name: predictions.csv}; `left_out` names the strategies the run
    did not compare, with the reason (report.md says so); returns the metrics written to
    metrics.json.

    An image task (`space` given: `image.classes`, `image.multi_label`) is evaluated alike, image
    by image, cases from the image manifest. A multi-label one is scored by
    `efcm.evaluation.metrics.multilabel_scores`: `auc` is the macro AUROC (what the gate reads),
    `f1` the mean per-class F1 at thresholds picked on each fold's validation predictions
    (`val_predictions.csv` next to each predictions.csv; `threshold_by_fold`), recorded per
    row under `thresholds`; `auc_<class>` and `f1_<class>` per class; ROC curves
    `roc/<model>.<class>.csv`, no confusion matrix.

    Args:
        predictions: {row name: predictions.csv}; `teacher` is the reference of the paired
            deltas of the `student.*` rows; `teacher.finetune` (the image teacher fine-tuned),
            when given, that of the `*_vs_teacher_finetune` deltas of the fine-tuned student.
        out_dir: where metrics.json, roc/, confusion/, report.md (and efficiency.json) go.
        params: the run's params (`evaluate.bootstrap`, `evaluate.ci`, `seed`, classes).
        efficiency: teacher vs student cost (`measure_efficiency`), if measured.
        localisation: {row name: mean attention localisation AUROC}, if measured.
        cases: {slide_id: case_id} (the manifest's); intervals resample cases. None: each slide
            is its own case, and the report says the intervals resample slides.
        space: the label space of an image task; None: the slide task (`dataset.classes`).
    """
    classes = space.classes if space else tuple(params.dataset.classes)
    multi_label = space is not None and space.multi_label
    out = Path(out_dir)
    (out / "roc").mkdir(parents=True, exist_ok=True)
    preds = {name: _read_sorted(p, classes, multi_label) for name, p in predictions.items()}
    _check_same_slides(preds)
    groups = _groups(next(iter(preds.values()))[2], cases)
    # one seed and one set of cases for every row: all rows are scored on the same resamples
    n_boot, ci, seed = params.evaluate.bootstrap, params.evaluate.ci, params.seed
    # each row scored once on the resamples; its interval and its paired difference with the
    # teacher both read those scores
    called: dict[str, np.ndarray] = {}  # multi-label: each row's 0/1 calls
    picked: dict[str, dict[int, dict[str, Any]]] = {}  # and the thresholds that made them
    if multi_label:
        for name, (probs, _, _, folds) in preds.items():
            called[name], picked[name] = _calls(Path(predictions[name]), probs, folds, classes)
        scores = {
            name: multilabel_scores(
                probs, labels, called[name], classes, groups=groups, n_bootstrap=n_boot, seed=seed
            )
            for name, (probs, labels, _, _) in preds.items()
        }
    else:
        scores = {
            name: bootstrap_scores(
                probs, labels, len(classes), groups=groups, n_bootstrap=n_boot, seed=seed
            )
            for name, (probs, labels, _, _) in preds.items()
        }
    metrics: dict[str, Any] = {}
    for name, (probs, labels, _, folds) in preds.items():
        m = summarise(scores[name], ci)
        per_fold = [
            multilabel_scores(
                probs[folds == f], labels[folds == f], called[name][folds == f], classes,
                n_bootstrap=0,
            ).point
            if multi_label
            else classification_metrics(
                probs[folds == f], labels[folds == f], len(classes), n_bootstrap=0
            )
            for f in np.unique(folds)
        ]  # fmt: skip
        for k in scores[name].metrics:  # the mean over folds, next to the pooled estimate
            values = [pf[k] for pf in per_fold if not np.isnan(pf[k])]
            m[f"{k}_fold_mean"] = float(np.mean(values)) if values else float("nan")
        if is_student_row(name) and TEACHER_ROW in preds:
            m.update(paired(scores[name], scores[TEACHER_ROW], ci))
        if fine_tuned_row(name) and TEACHER_FINETUNE_ROW in preds:
            tuned = scores[TEACHER_FINETUNE_ROW]
            m.update(paired(scores[name], tuned, ci, suffix=TEACHER_FINETUNE_DELTA))
        # the efficiency report's roles: the teacher encoder (probed or fine-tuned: one cost per
        # image), the student encoder
        teacher = name in (TEACHER_ROW, TEACHER_FINETUNE_ROW)
        role = "teacher" if teacher else "student" if is_student_row(name) else None
        if efficiency and role in efficiency:
            e = efficiency[role]
            m.update(
                params=e["params"],
                gflops_per_patch=e["gflops_per_patch"],
                patches_per_s=e["patches_per_s"],
            )
        if localisation and localisation.get(name) is not None:
            m["localisation_auroc"] = localisation[name]
        metrics[name] = {
            k: (round(v, 6) + 0.0 if isinstance(v, float) else v) for k, v in m.items()
        }
        if multi_label:
            metrics[name]["thresholds"] = {str(k): v for k, v in picked[name].items()}
            for c, cls in enumerate(classes):
                if len(np.unique(labels[:, c])) == 2:  # a class with one value has no curve
                    _write_csv(
                        out / "roc" / f"{name}.{cls}.csv",
                        ["fpr", "tpr", "threshold"],
                        roc_points(probs, labels, positive=c),
                    )
            continue
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
    text = report(metrics, params, case_level=cases is not None, left_out=left_out, space=space)
    if efficiency:
        item = "image" if space else "patch"
        if space:  # the profile's keys keep the slide path's names: say what they measure
            efficiency = {**efficiency, "per": "image: gflops_per_patch and patches_per_s are "
                          "per whole image here"}  # fmt: skip
        save_json(out / "efficiency.json", efficiency)
        text += f"\n## Cost per {item} (teacher vs student, one run, this machine)\n\n"
        text += markdown_table(efficiency, item) + "\n"
    (out / "report.md").write_text(text)
    return metrics


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """`{"teacher": {"auc": ...}}` -> `{"teacher.auc": ...}`: finite numbers only (a NaN AUC of a
    one-class evaluation is left out; metrics.json keeps it)."""
    flat = {}
    for model, values in metrics.items():
        for k, v in values.items():
            if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v):
                flat[f"{model}.{k}"] = float(v)
    return flat


def _ci_cell(m: dict[str, Any], key: str) -> str:
    return f"{m[key]:.3f} [{m[key + '_ci_low']:.3f}, {m[key + '_ci_high']:.3f}]"


def _intervals_text(
    metrics: dict[str, Any], params: Params, case_level: bool, space: LabelSpace | None = None
) -> str:
    """What the intervals estimate, in words, from the first model row (every row shares the
    slides, the cases and the resamples)."""
    m = next(v for k, v in metrics.items() if k != "efficiency")
    n, n_cases, b = m["n"], m["n_cases"], m["bootstrap"]
    if b == 0:
        return "No intervals: `evaluate.bootstrap` is 0, so the bracketed bounds are NaN."
    unit = "image" if space else "slide"
    classes = space.classes if space else params.dataset.classes
    one_class = "a single class" if len(classes) == 2 else "a class missing"
    if space and space.multi_label:
        one_class = "a scored class lacking its positive or its negative images"
    dropped = f"{m['bootstrap_dropped']} resamples with {one_class} dropped"
    ci = round(params.evaluate.ci * 100)
    if case_level:
        return (
            f"{ci}% percentile intervals from {b} resamples of patients (case_id), "
            f"{n} {unit}s of {n_cases} patients; {dropped}. The {unit}s of one patient are drawn "
            "together, and every row (and both sides of each difference) uses the same resamples."
        )
    return (
        f"{ci}% percentile intervals from {b} resamples of {unit}s (no case ids were given, so "
        f"each {unit} counts as its own patient: the intervals are too narrow when a patient has "
        f"several {unit}s), {n} {unit}s; {dropped}."
    )


MULTILABEL_NOTE = (
    "Multi-label task: `auc` is the macro AUROC, the mean of the per-class AUROCs over the classes "
    "that hold both positive and negative test images (a class with one value only has no AUROC "
    "and is left out, with NaN); `f1` is the mean per-class F1 over the same classes, each "
    "image called positive when its probability reaches the class threshold of its fold, picked "
    "as the threshold of maximal F1 on that fold's validation images (never its test images; "
    "0.5 where the validation images hold one value only: metrics.json `thresholds`)."
)


DISTILLATION_NOTE = (
    "Distillation used the unlabelled pixels of every slide, the test folds' slides included. "
    "That is not label leakage: distillation never sees a label; it only fits the student to the "
    "teacher's features, which the teacher computes on every slide alike. The labels of the "
    "test-fold slides are used only to score the models in these tables."
)


_DELTA_WORDS = {"auc": "AUC", "balanced_acc": "balanced acc", "f1": "F1"}
# the model column of report.md when the fine-tuned teacher is there: which teacher is which
ROW_LABELS = {
    TEACHER_ROW: f"{TEACHER_ROW} (linear probe)",
    TEACHER_FINETUNE_ROW: f"{TEACHER_FINETUNE_ROW} (teacher fine-tuned end to end)",
}
TEACHER_FINETUNE_NOTE = (
    f"`{TEACHER_ROW}` is the teacher's linear probe (a head on its frozen features); "
    f"`{TEACHER_FINETUNE_ROW}` the teacher fine-tuned end to end with its head per fold "
    "(`image.teacher_finetune`: the same `image.finetune` settings and folds as the student's "
    "fine-tune). The student minus teacher deltas are against the probe; the fine-tuned student's "
    f"deltas against `{TEACHER_FINETUNE_ROW}` have their own table (metrics.json "
    f"`delta_<metric>{TEACHER_FINETUNE_DELTA}`)."
)


def _finetune_deltas(rows: dict[str, Any], delta_names: tuple[str, ...], ci: int) -> str:
    """report.md's table of the fine-tuned student minus the fine-tuned teacher (empty when no
    row has those deltas)."""
    key = f"delta_auc{TEACHER_FINETUNE_DELTA}"
    tuned = {name: m for name, m in rows.items() if key in m}
    if not tuned:
        return ""
    head = ["model"] + [
        f"delta {_DELTA_WORDS.get(k, k)} vs {TEACHER_FINETUNE_ROW} ({ci}% CI)" for k in delta_names
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in tuned.items():
        cells = [name] + [_ci_cell(m, f"delta_{k}{TEACHER_FINETUNE_DELTA}") for k in delta_names]
        lines.append("| " + " | ".join(cells) + " |")
    return (
        f"\n## Fine-tuned student minus fine-tuned teacher (`{TEACHER_FINETUNE_ROW}`; paired, "
        "case-level bootstrap)\n\n"
        "Both fine-tuned end to end on the same folds with the same settings; each difference is "
        "computed on the same resamples as the tables above. These deltas are not the gate's "
        "(it reads the deltas against the probe).\n\n" + "\n".join(lines) + "\n"
    )


def report(
    metrics: dict[str, Any],
    params: Params,
    *,
    case_level: bool = True,
    left_out: Mapping[str, str] | None = None,
    space: LabelSpace | None = None,
) -> str:
    """report.md: the metrics table with CIs, the paired student minus teacher table, what the
    intervals estimate, and the strategies left out and why. `case_level`: the intervals
    resampled case ids (not slides). `space`: an image task's label space (see `evaluate`)."""
    ci = round(params.evaluate.ci * 100)
    unit = "image" if space else "slide"
    multi_label = space is not None and space.multi_label
    names: tuple[str, ...] = METRICS
    delta_names: tuple[str, ...] = ("auc", "balanced_acc", "f1")
    if multi_label:  # the macro AUROC, the mean F1, the AUROC of each class; and their deltas
        names = delta_names = ("auc", "f1", *(f"auc_{c}" for c in space.classes))
    extra = "each fold's thresholds" if multi_label else "the confusion matrix"
    item = "image" if space else "patch"  # what one model input is (the cost columns' unit)
    head = ["model", f"{unit}s", "patients", "params", f"GFLOPs/{item}", f"{PLURAL[item]}/s"]
    head += [f"{m} ({ci}% CI)" for m in names] + ["attention localisation AUROC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = {name: m for name, m in metrics.items() if name != "efficiency"}
    tuned = TEACHER_FINETUNE_ROW in rows
    for name, m in rows.items():
        cells = [
            ROW_LABELS.get(name, name) if tuned else name,
            str(m["n"]),
            str(m["n_cases"]) if case_level else "-",
            f"{m.get('params', float('nan')):,}" if "params" in m else "-",
            f"{m['gflops_per_patch']:.3f}" if "gflops_per_patch" in m else "-",
            f"{m['patches_per_s']:.1f}" if "patches_per_s" in m else "-",
        ]
        cells += [_ci_cell(m, k) for k in names]
        loc = m.get("localisation_auroc")
        cells.append("-" if loc is None else f"{loc:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    text = (
        f"# EFCM evaluation\n\n{unit.capitalize()}-level metrics of the out-of-fold predictions "
        "pooled over the folds (the same patient-level folds for every row), with bootstrap CIs; "
        "metrics.json also has each metric's mean over folds (`<metric>_fold_mean`) and "
        f"{extra}.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + _intervals_text(metrics, params, case_level, space)
        + "\n"
        + (f"\n{MULTILABEL_NOTE}\n" if multi_label else "")
        + (f"\n{TEACHER_FINETUNE_NOTE}\n" if tuned else "")
    )
    deltas = {name: m for name, m in rows.items() if "delta_auc" in m}
    if deltas:
        head = ["model"] + [f"delta {_DELTA_WORDS.get(k, k)} ({ci}% CI)" for k in delta_names]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, m in deltas.items():
            cells = [name] + [_ci_cell(m, f"delta_{k}") for k in delta_names]
            lines.append("| " + " | ".join(cells) + " |")
        vs = f" linear probe (`{TEACHER_ROW}`; " if tuned else " ("
        text += (
            f"\n## Student minus teacher{vs}paired, case-level bootstrap)\n\n"
            "Each difference is computed on the same resample for both models, so the interval "
            "is that of the difference itself; an interval below 0 means the student is worse"
            + ("" if case_level else f" (here each {unit} is its own case)")
            + ".\n\n"
            + "\n".join(lines)
            + "\n"
        )
    text += _finetune_deltas(rows, delta_names, ci)
    if left_out:
        text += "\n## Strategies left out\n\n" + "".join(
            f"- `{name}`: {why}\n" for name, why in left_out.items()
        )
    note = DISTILLATION_NOTE.replace("slide", unit)
    return text + "\n## Distillation and the test folds\n\n" + note + "\n"


def measure_efficiency(
    params: Params,
    student_ckpt: str | Path,
    batch_size: int | None = None,
    min_seconds: float = 1.0,
    cache: SlideCache | None = None,
) -> dict[str, Any]:
    """Teacher vs the distilled student, in one run on this machine's default device, at the
    extraction batch size (`extract.batch_size`) unless given; gs:// teacher weights are staged
    into `cache`."""
    import torch

    from efcm.models.encoders import build_backbone
    from efcm.models.students import load_student

    teacher, _ = build_backbone(params.teacher, warn_random=False, cache=cache)
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
