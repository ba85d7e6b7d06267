"""Slide-level metrics with torchmetrics, each with a seeded bootstrap confidence interval.

AUC is binary AUROC for two classes and macro one-vs-rest otherwise. A bootstrap resample that
holds a
single class (AUC undefined) is skipped; the number of usable resamples is reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_roc,
    multiclass_accuracy,
    multiclass_auroc,
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
            from torchmetrics.functional.classification import binary_auroc

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
