"""Slide-level metrics with torchmetrics, each with a seeded, patient-level bootstrap interval.

AUC is binary AUROC for two classes and macro one-vs-rest otherwise.

Intervals resample patients, not slides (`case_resamples`): a resample draws as many cases as there
are, with replacement, and takes every slide of each drawn case, so the several slides of one
patient move together and do not pass for independent evidence. A resample that lacks a class (for
two classes: holds a single class, where AUC is undefined) is dropped for every metric alike, so
all the intervals of one evaluation come from the same resamples; `bootstrap_dropped` counts them.
The intervals are percentile intervals. `paired_delta` applies the same resamples to two models
scored on the same slides (student minus teacher): usually far tighter than comparing two separate
intervals, because the case mix that helps or hurts one model tends to do the same to the other.

Multi-label image tasks (`multilabel_scores`) go through the same resamples: per-class AUROC,
the macro AUROC as `auc`, and the mean per-class F1 at thresholds picked on each fold's
validation rows (`pick_thresholds`, `threshold_by_fold`); their `Scores` name their own metrics,
and `paired` compares them alike.

Localisation: a slide's patch attention is scored against its tumour ground-truth mask by AUROC
(`localisation_auroc`): a patch counts as tumour when at least half of its footprint on the mask is
tumour. Slides without tumour patches, or with only tumour patches, have no AUROC (NaN) and are
left out of the mean (`mean_localisation_auroc`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_roc,
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multilabel_auroc,
    multilabel_f1_score,
)

METRICS = ("acc", "balanced_acc", "auc", "f1")
DELTA_METRICS = ("auc", "balanced_acc", "f1")


def _point(probs: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict[str, float]:
    pred = probs.argmax(1)
    out = {
        "acc": multiclass_accuracy(pred, labels, n_classes, average="micro").item(),
        "balanced_acc": multiclass_accuracy(pred, labels, n_classes, average="macro").item(),
        "f1": multiclass_f1_score(pred, labels, n_classes, average="macro").item(),
        "auc": float("nan"),
    }
    if len(torch.unique(labels)) == n_classes:
        if n_classes == 2:
            out["auc"] = binary_auroc(probs[:, 1], labels).item()
        else:
            out["auc"] = multiclass_auroc(probs, labels, n_classes, average="macro").item()
    return out


def _check_probs(p: torch.Tensor, y: torch.Tensor, n_classes: int, what: str = "probs") -> None:
    if p.ndim != 2 or p.shape[1] != n_classes or len(p) != len(y):
        raise ValueError(
            f"{what} must be [N, {n_classes}] with N = len(labels); got {list(p.shape)}, "
            f"{len(y)} labels"
        )


def _case_codes(groups: Sequence[str] | None, n: int) -> tuple[np.ndarray, int]:
    """(N,) case index of each row and the number of cases; None: each row its own case."""
    if groups is None:
        return np.arange(n), n
    g = np.asarray([str(c) for c in groups])
    if len(g) != n:
        raise ValueError(f"groups has {len(g)} case ids for {n} rows: give one per row")
    # sorted unique ids: the draws do not depend on the order of the rows
    cases, codes = np.unique(g, return_inverse=True)
    return codes.reshape(-1), len(cases)


def _resamples(
    codes: np.ndarray, n_cases: int, n_bootstrap: int, seed: int
) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(seed)
    order = np.argsort(codes, kind="stable")  # the rows of case 0, then of case 1, ...
    counts = np.bincount(codes, minlength=n_cases)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    for _ in range(n_bootstrap):
        drawn = rng.integers(0, n_cases, n_cases)
        lengths = counts[drawn]
        # position j of the output is row k of drawn case c: starts[c] + k, without a Python loop
        first = np.repeat(np.cumsum(lengths) - lengths, lengths)
        k = np.arange(int(lengths.sum())) - first
        yield order[np.repeat(starts[drawn], lengths) + k]


def case_resamples(groups: Sequence[str], n_bootstrap: int, seed: int) -> Iterator[np.ndarray]:
    """Patient-level bootstrap: `n_bootstrap` arrays of row indices.

    Each resample draws len(unique cases) cases with replacement and yields the indices of all
    rows (slides) of the drawn cases; a case drawn twice contributes its slides twice. The same
    `groups` and `seed` give the same resamples, whatever the order of the rows.

    Args:
        groups: the case id of each row.
        n_bootstrap: number of resamples.
        seed: seed of the draws.
    """
    codes, n_cases = _case_codes(groups, len(groups))
    return _resamples(codes, n_cases, n_bootstrap, seed)


def _resampled_points(
    point: Callable[[torch.Tensor], dict[str, float]],
    valid: Callable[[torch.Tensor], bool],
    names: Sequence[str],
    groups: Sequence[str] | None,
    n: int,
    n_bootstrap: int,
    seed: int,
) -> tuple[np.ndarray, int]:
    """(kept resamples, len(names)) metric values, and the number of resamples dropped because
    `valid` refused them (it looks at the labels only, so the count is the same for every model).

    `point(idx)` scores the rows `idx` (a LongTensor); `valid(idx)` says whether they can be
    scored (slides: every class present)."""
    codes, n_cases = _case_codes(groups, n)
    kept, dropped = [], 0
    for idx in _resamples(codes, n_cases, n_bootstrap, seed):
        rows = torch.from_numpy(idx)
        if not valid(rows):
            dropped += 1
            continue
        values = point(rows)
        kept.append([values[m] for m in names])
    return np.asarray(kept, np.float64).reshape(-1, len(names)), dropped


def _interval(samples: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval of `samples`; NaN, NaN when there are none."""
    if len(samples) == 0:
        return float("nan"), float("nan")
    alpha = (1 - ci) / 2
    return float(np.quantile(samples, alpha)), float(np.quantile(samples, 1 - alpha))


@dataclass(frozen=True)
class Scores:
    """One model's metrics on all rows and on every bootstrap resample: computed once, then
    summarised (`summarise`) and compared with another model's on the same resamples
    (`paired`)."""

    point: dict[str, float]
    samples: np.ndarray  # (kept resamples, len(metrics))
    dropped: int  # resamples lacking a class (depends on labels and draws only)
    n: int
    n_cases: int
    n_bootstrap: int
    seed: int
    metrics: tuple[str, ...] = METRICS  # the columns of `samples`
    deltas: tuple[str, ...] = DELTA_METRICS  # those `paired` compares


def bootstrap_scores(
    probs: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    groups: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    what: str = "probs",
) -> Scores:
    """Score a model on all rows and on `n_bootstrap` patient-level resamples (see
    `case_resamples`; `groups` None: each row is its own case)."""
    p, y = torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    _check_probs(p, y, n_classes, what)
    samples, dropped = _resampled_points(
        lambda idx: _point(p[idx], y[idx], n_classes),
        lambda idx: len(torch.unique(y[idx])) == n_classes,
        METRICS,
        groups,
        len(y),
        n_bootstrap,
        seed,
    )
    n_cases = _case_codes(groups, len(y))[1]
    return Scores(_point(p, y, n_classes), samples, dropped, len(y), n_cases, n_bootstrap, seed)


def summarise(scores: Scores, ci: float) -> dict[str, Any]:
    """The point estimates with their percentile intervals, and the counts (see
    `classification_metrics`)."""
    out: dict[str, Any] = dict(scores.point)
    for j, m in enumerate(scores.metrics):
        out[f"{m}_ci_low"], out[f"{m}_ci_high"] = _interval(scores.samples[:, j], ci)
    out["n"] = scores.n
    out["n_cases"] = scores.n_cases
    out["bootstrap"] = scores.n_bootstrap
    out["bootstrap_dropped"] = scores.dropped
    return out


def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    groups: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Point estimates on all rows and patient-level bootstrap intervals.

    Args:
        probs: (N, n_classes) class probabilities, one row per slide.
        labels: (N,) class indices.
        n_classes: number of classes.
        groups: the case (patient) id of each row; None: each row is its own case.
        n_bootstrap: resamples requested (0: no intervals, NaN bounds).
        ci: coverage of the percentile intervals.
        seed: seed of the resamples (give two models the same one to resample them alike).

    Returns:
        `acc`, `balanced_acc`, `auc`, `f1`, each with `<metric>_ci_low` / `_ci_high`, plus `n`
        (slides), `n_cases`, `bootstrap` (requested) and `bootstrap_dropped` (resamples lacking a
        class, left out of every interval).
    """
    scores = bootstrap_scores(
        probs, labels, n_classes, groups=groups, n_bootstrap=n_bootstrap, seed=seed
    )
    return summarise(scores, ci)


def paired(student: Scores, teacher: Scores, ci: float, suffix: str = "") -> dict[str, Any]:
    """Student minus teacher from their scores on the same resamples (see `paired_delta`):
    `delta_<metric><suffix>` and its `_ci_low` / `_ci_high`, `delta_bootstrap_dropped<suffix>`
    (`suffix` names another reference than the teacher probe, e.g. `_vs_teacher_finetune`)."""
    same = ("n", "n_cases", "n_bootstrap", "seed", "dropped", "metrics", "deltas")
    if any(getattr(student, k) != getattr(teacher, k) for k in same):
        raise ValueError(
            "paired: the two models were not scored on the same resamples (give both the same "
            "slides, labels, case ids, bootstrap count and seed)"
        )
    diff = student.samples - teacher.samples  # the same resamples, row by row
    out: dict[str, Any] = {}
    for m in student.deltas:
        j = student.metrics.index(m)
        key = f"delta_{m}{suffix}"
        out[key] = student.point[m] - teacher.point[m]
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = _interval(diff[:, j], ci)
    out[f"delta_bootstrap_dropped{suffix}"] = student.dropped
    return out


def paired_delta(
    student_probs: np.ndarray,
    teacher_probs: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    groups: Sequence[str] | None,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Student minus teacher, with a paired patient-level bootstrap.

    Both models are scored on the same resamples of cases (the same `groups` and `seed`), and the
    interval is the percentile interval of the per-resample differences.

    Args:
        student_probs: (N, n_classes) probabilities of the student, row i = slide i.
        teacher_probs: (N, n_classes) probabilities of the teacher on the same slides, same order.
        labels: (N,) class indices of those slides.
        n_classes: number of classes.
        groups: the case id of each row; None: each row is its own case.
        n_bootstrap: resamples requested.
        ci: coverage of the intervals.
        seed: seed of the resamples.

    Returns:
        `delta_auc`, `delta_auc_ci_low`, `delta_auc_ci_high`, the same for `balanced_acc` and
        `f1`, and `delta_bootstrap_dropped` (resamples lacking a class).

    Raises:
        ValueError: the two models' probabilities, the labels or the groups disagree in shape.
    """
    s_shape, t_shape = np.shape(student_probs), np.shape(teacher_probs)
    if s_shape != t_shape:
        raise ValueError(
            f"student probs {list(s_shape)} and teacher probs {list(t_shape)} differ in shape: "
            "give both models' predictions on the same slides, in the same order"
        )
    kw = {"groups": groups, "n_bootstrap": n_bootstrap, "seed": seed}
    s = bootstrap_scores(student_probs, labels, n_classes, what="student probs", **kw)
    t = bootstrap_scores(teacher_probs, labels, n_classes, what="teacher probs", **kw)
    return paired(s, t, ci)


# -- multi-label tasks (images: a chest X-ray may show several findings) ---------------------------

#: The threshold of a class whose validation rows of a fold hold one label value only (no positive,
#: or no negative image): no threshold can be picked on them, so the probability 0.5 is used, the
#: decision boundary of a head trained with BCE.
FALLBACK_THRESHOLD = 0.5
MULTILABEL_METRICS = ("auc", "f1")


def scored_classes(targets: np.ndarray) -> np.ndarray:
    """(C,) bool: the classes that hold both label values among `targets` (N, C) 0/1, the only
    ones with an AUROC (and a defined F1 at every threshold)."""
    t = np.asarray(targets)
    if len(t) == 0:
        return np.zeros(t.shape[1] if t.ndim == 2 else 0, bool)
    return (t.max(0) > 0) & (t.min(0) == 0)


def pick_thresholds(probs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the threshold of maximal F1 on these rows (a fold's validation predictions).

    A row is predicted positive when its probability is >= the threshold; the candidates are the
    class's distinct probabilities, and among thresholds of equal F1 the highest is taken (the
    fewest positive calls). A class with one label value only in these rows gets
    `FALLBACK_THRESHOLD`.

    Args:
        probs: (N, C) probabilities.
        targets: (N, C) 0/1 labels.

    Returns:
        thresholds (C,) float64, and fell_back (C,) bool: the classes given the fallback.
    """
    p, t = np.asarray(probs, np.float64), np.asarray(targets)
    if p.ndim != 2 or p.shape != t.shape:
        raise ValueError(
            f"probs {list(p.shape)} and targets {list(t.shape)} must be the same (N, C)"
        )
    ok = scored_classes(t)
    thresholds = np.full(p.shape[1], FALLBACK_THRESHOLD)
    for c in np.flatnonzero(ok):
        order = np.argsort(-p[:, c], kind="stable")
        ps, ys = p[order, c], t[order, c] > 0
        last = np.r_[ps[1:] != ps[:-1], True]  # the last row of each distinct probability
        tp = np.cumsum(ys)[last]
        fp = np.cumsum(~ys)[last]
        f1 = 2 * tp / (2 * tp + fp + (ys.sum() - tp))
        thresholds[c] = ps[last][int(np.argmax(f1))]  # first maximum: the highest threshold
    return thresholds, ~ok


def threshold_by_fold(
    probs: np.ndarray,
    folds: np.ndarray,
    val_probs: np.ndarray,
    val_targets: np.ndarray,
    val_folds: np.ndarray,
) -> tuple[np.ndarray, dict[int, dict[str, Any]]]:
    """The 0/1 calls of test predictions at thresholds picked on the validation split of their own
    fold (`pick_thresholds`): the test rows never choose their threshold.

    Args:
        probs: (N, C) test (out-of-fold) probabilities; folds: (N,) the fold of each.
        val_probs, val_targets: (M, C) each fold's validation predictions and 0/1 labels;
            val_folds: (M,) the fold whose validation split each row belongs to.

    Returns:
        predicted (N, C) int64, and {fold: {"thresholds": [C floats], "fallback": [class
        indices given FALLBACK_THRESHOLD]}}.
    """
    p, f = np.asarray(probs, np.float64), np.asarray(folds)
    vp, vt, vf = np.asarray(val_probs), np.asarray(val_targets), np.asarray(val_folds)
    predicted = np.zeros(p.shape, np.int64)
    picked: dict[int, dict[str, Any]] = {}
    for k in np.unique(f):
        thr, fell_back = pick_thresholds(vp[vf == k], vt[vf == k])
        rows = f == k
        predicted[rows] = (p[rows] >= thr).astype(np.int64)
        picked[int(k)] = {
            "thresholds": [float(x) for x in thr],
            "fallback": [int(c) for c in np.flatnonzero(fell_back)],
        }
    return predicted, picked


def _multilabel_point(
    p: torch.Tensor, y: torch.Tensor, called: torch.Tensor, cols: list[int], classes: Sequence[str]
) -> dict[str, float]:
    out = {f"{m}_{c}": float("nan") for m in MULTILABEL_METRICS for c in classes}
    out.update(auc=float("nan"), f1=float("nan"))
    if not cols:
        return out
    n = len(cols)
    auc = multilabel_auroc(p[:, cols], y[:, cols], n, average="none").reshape(-1)
    f1 = multilabel_f1_score(called[:, cols], y[:, cols], n, average="none").reshape(-1)
    for j, c in enumerate(cols):
        out[f"auc_{classes[c]}"] = float(auc[j])
        out[f"f1_{classes[c]}"] = float(f1[j])
    out["auc"], out["f1"] = float(auc.mean()), float(f1.mean())
    return out


def multilabel_scores(
    probs: np.ndarray,
    targets: np.ndarray,
    predicted: np.ndarray,
    classes: Sequence[str],
    *,
    groups: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    what: str = "probs",
) -> Scores:
    """Score a multi-label model on all rows and on patient-level resamples (`case_resamples`).

    `auc` is the macro AUROC: the mean of the per-class AUROCs (`auc_<class>`) over the classes
    that hold both label values among all the rows (`scored_classes`); a class with one value only
    has NaN metrics and is left out of both means, on every resample alike. `f1` is the mean over
    the same classes of the per-class F1 (`f1_<class>`) of the 0/1 calls `predicted` (made at
    thresholds picked on validation rows: `threshold_by_fold`; they stay fixed across
    resamples). A resample in which a scored class lacks its positives or its negatives is
    dropped for every metric (`dropped`), so every kept resample averages the same classes.

    Args:
        probs: (N, C) probabilities; targets: (N, C) 0/1 labels; predicted: (N, C) 0/1 calls.
        classes: the C class names (the per-class keys).
        groups: the case id of each row; None: each row is its own case.

    Raises:
        ValueError: the three arrays are not all (N, C) with C = len(classes).
    """
    shapes = {k: np.shape(v) for k, v in (("probs", probs), ("targets", targets),
                                          ("predicted", predicted))}  # fmt: skip
    if (
        any(len(sh) != 2 or sh[1] != len(classes) for sh in shapes.values())
        or len(set(shapes.values())) > 1
    ):
        raise ValueError(
            f"{what}: probs, targets and predicted must all be [N, {len(classes)}]; got "
            + ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
        )
    p = torch.as_tensor(np.asarray(probs), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    called = torch.as_tensor(np.asarray(predicted), dtype=torch.long)
    cols = [int(c) for c in np.flatnonzero(scored_classes(np.asarray(targets)))]
    per_class = tuple(f"{m}_{c}" for m in MULTILABEL_METRICS for c in classes)

    def valid(idx: torch.Tensor) -> bool:
        yi = y[idx][:, cols]
        return bool(((yi.max(0).values > 0) & (yi.min(0).values == 0)).all()) if cols else True

    samples, dropped = _resampled_points(
        lambda idx: _multilabel_point(p[idx], y[idx], called[idx], cols, classes),
        valid,
        MULTILABEL_METRICS + per_class,
        groups,
        len(y),
        n_bootstrap,
        seed,
    )
    return Scores(
        _multilabel_point(p, y, called, cols, classes),
        samples,
        dropped,
        len(y),
        _case_codes(groups, len(y))[1],
        n_bootstrap,
        seed,
        metrics=MULTILABEL_METRICS + per_class,
        deltas=(*MULTILABEL_METRICS, *(f"auc_{c}" for c in classes)),
    )


def roc_points(probs: np.ndarray, labels: np.ndarray, positive: int = 1) -> list[dict[str, float]]:
    """ROC curve of class `positive` vs the rest: [{fpr, tpr, threshold}, ...]. `labels`: (N,)
    class indices, or (N, C) 0/1 (multi-label: the images showing class `positive`)."""
    truth = labels[:, positive] > 0 if np.ndim(labels) == 2 else labels == positive
    fpr, tpr, thr = binary_roc(
        torch.as_tensor(probs[:, positive], dtype=torch.float32),
        torch.as_tensor(truth, dtype=torch.long),
    )
    return [
        {"fpr": round(float(a), 6), "tpr": round(float(b), 6), "threshold": round(float(c), 6)}
        for a, b, c in zip(fpr, tpr, thr, strict=True)
    ]


def confusion(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> list[list[int]]:
    """Confusion matrix of the argmax predictions: row = true class, column = predicted class."""
    p, y = torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    _check_probs(p, y, n_classes)
    if len(y) == 0:
        return [[0] * n_classes for _ in range(n_classes)]
    cm = multiclass_confusion_matrix(p.argmax(1), y, n_classes)
    return [[int(v) for v in row] for row in cm.tolist()]


def patch_tumour_fraction(
    coords: np.ndarray, size0: int, tumour_mask: np.ndarray, mask_downsample: float
) -> np.ndarray:
    """(N,) share of each patch's footprint on the mask that is tumour (mask > 0).

    Args:
        coords: (N, 2) level-0 top-left x, y.
        size0: patch side in level-0 px.
        tumour_mask: (h, w) mask at 1/`mask_downsample` of level 0; any value > 0 is tumour.
        mask_downsample: level-0 px per mask px.
    """
    mask = np.asarray(tumour_mask)
    if mask.ndim != 2:
        raise ValueError(f"tumour mask must be (h, w), got shape {list(mask.shape)}")
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    h, w = mask.shape
    # summed-area table: each footprint's tumour count in O(1), whatever the patch size
    sat = np.zeros((h + 1, w + 1), np.int64)
    sat[1:, 1:] = (mask > 0).astype(np.int64).cumsum(0).cumsum(1)
    x0 = np.floor(coords[:, 0] / mask_downsample).astype(np.int64)
    y0 = np.floor(coords[:, 1] / mask_downsample).astype(np.int64)
    x1 = np.maximum(x0 + 1, np.ceil((coords[:, 0] + size0) / mask_downsample).astype(np.int64))
    y1 = np.maximum(y0 + 1, np.ceil((coords[:, 1] + size0) / mask_downsample).astype(np.int64))
    x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    area = (x1 - x0) * (y1 - y0)
    count = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
    return np.where(area > 0, count / np.maximum(area, 1), 0.0)


def localisation_auroc(
    attention: np.ndarray,
    coords: np.ndarray,
    size0: int,
    tumour_mask: np.ndarray,
    mask_downsample: float,
) -> float:
    """AUROC of the patch attention (N,) against "the patch is tumour" (at least half of its
    footprint on the mask). NaN when the slide has no tumour patch or only tumour patches."""
    attention = np.asarray(attention, np.float64).reshape(-1)
    coords = np.asarray(coords).reshape(-1, 2)
    if len(attention) != len(coords):
        raise ValueError(f"{len(coords)} coords but {len(attention)} attention scores")
    is_tumour = patch_tumour_fraction(coords, size0, tumour_mask, mask_downsample) >= 0.5
    if is_tumour.all() or not is_tumour.any():
        return float("nan")
    # dense ranks in [0, 1]: same AUROC, and torchmetrics never mistakes the scores for logits
    _, ranks = np.unique(attention, return_inverse=True)
    preds = torch.as_tensor(ranks / max(int(ranks.max()), 1), dtype=torch.float64)
    return float(binary_auroc(preds, torch.as_tensor(is_tumour, dtype=torch.long)).item())


def mean_localisation_auroc(aurocs: Mapping[str, float] | Iterable[float]) -> float:
    """Mean of the slides' localisation AUROCs, NaN ones (no AUROC) skipped; NaN if none is left."""
    values = np.asarray(
        list(aurocs.values() if isinstance(aurocs, Mapping) else aurocs), np.float64
    )
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")
