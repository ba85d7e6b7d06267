"""Slide-level metrics with torchmetrics, each with a seeded bootstrap confidence interval.

AUC is binary AUROC for two classes and macro one-vs-rest otherwise. A bootstrap resample that
holds a
single class (AUC undefined) is skipped; the number of usable resamples is reported.

Localisation: a slide's patch attention is scored against its tumour ground-truth mask by AUROC
(`localisation_auroc`): a patch counts as tumour when at least half of its footprint on the mask is
tumour. Slides without tumour patches, or with only tumour patches, have no AUROC (NaN) and are
left out of the mean (`mean_localisation_auroc`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
)

METRICS = ("acc", "balanced_acc", "auc", "f1")


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


def classification_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Point estimates and bootstrap CIs: keys `auc`, `auc_ci_low`, `auc_ci_high`, ... plus `n`."""
    p, y = torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    if p.ndim != 2 or p.shape[1] != n_classes or len(p) != len(y):
        raise ValueError(
            f"probs must be [N, {n_classes}] with N = len(labels); got {list(p.shape)}, "
            f"{len(y)} labels"
        )
    out: dict[str, Any] = dict(_point(p, y, n_classes))
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(n_bootstrap):
        idx = torch.from_numpy(rng.integers(0, len(y), len(y)))
        for k, v in _point(p[idx], y[idx], n_classes).items():
            if not np.isnan(v):
                samples[k].append(v)
    alpha = (1 - ci) / 2
    for m in METRICS:
        s = samples[m]
        out[f"{m}_ci_low"] = float(np.quantile(s, alpha)) if s else float("nan")
        out[f"{m}_ci_high"] = float(np.quantile(s, 1 - alpha)) if s else float("nan")
    out["n"] = len(y)
    return out


def roc_points(probs: np.ndarray, labels: np.ndarray, positive: int = 1) -> list[dict[str, float]]:
    """ROC curve of class `positive` vs the rest: [{fpr, tpr, threshold}, ...]."""
    fpr, tpr, thr = binary_roc(
        torch.as_tensor(probs[:, positive], dtype=torch.float32),
        torch.as_tensor(labels == positive, dtype=torch.long),
    )
    return [
        {"fpr": round(float(a), 6), "tpr": round(float(b), 6), "threshold": round(float(c), 6)}
        for a, b, c in zip(fpr, tpr, thr, strict=True)
    ]


def confusion(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> list[list[int]]:
    """Confusion matrix of the argmax predictions: row = true class, column = predicted class."""
    p, y = torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    if p.ndim != 2 or p.shape[1] != n_classes or len(p) != len(y):
        raise ValueError(
            f"probs must be [N, {n_classes}] with N = len(labels); got {list(p.shape)}, "
            f"{len(y)} labels"
        )
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
