"""Slide-level learning: patient-level splits and CLAM training on a folder of features h5.

Splits are built once from `case_id` (no patient in two sets of a fold, class ratios kept) and
saved,
so the teacher baseline and every student are trained and tested on the same folds. Each fold
trains a
CLAM with Adam, class-weighted sampling and early stopping on the validation loss (best state kept),
then predicts its test slides; the out-of-fold predictions are what evaluation reads.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from efcm.config import Params, TrainMilParams
from efcm.features import read_features
from efcm.io.files import save_json
from efcm.io.manifest import Manifest
from efcm.io.results import write_predictions
from efcm.models.clam import CLAMBase, build_clam, save_clam

log = logging.getLogger(__name__)


def make_splits(
    manifest: Manifest,
    classes: tuple[str, ...],
    folds: int,
    val_fraction: float,
    seed: int,
    available: set[str] | None = None,
) -> dict[str, Any]:
    """Patient-level stratified k-fold: cases are dealt to folds per class; in each fold, a share of
    the remaining cases (at least one per class where possible) is held out for early stopping.

    Unlabelled slides (empty label) are left out and listed under `unlabelled` (a case keeps the
    label of its labelled slides); `available` restricts the slides considered, e.g. to those that
    extracted ok."""
    considered = [s for s in manifest.slides if available is None or s.slide_id in available]
    slides = [s for s in considered if s.labelled]
    unlabelled = sorted(s.slide_id for s in considered if not s.labelled)
    if unlabelled:
        log.info(
            "splits: %d unlabelled slide(s) left out (%s%s)",
            len(unlabelled),
            ", ".join(unlabelled[:5]),
            ", ..." if len(unlabelled) > 5 else "",
        )
    by_case: dict[str, list[str]] = defaultdict(list)
    case_label: dict[str, str] = {}
    for s in slides:
        by_case[s.case_id].append(s.slide_id)
        if case_label.setdefault(s.case_id, s.label) != s.label:
            raise ValueError(
                f"case {s.case_id} has slides with different labels "
                f"({case_label[s.case_id]!r}, {s.label!r}): cannot split by patient"
            )
    rng = np.random.default_rng(seed)
    per_class = {c: sorted(k for k, v in case_label.items() if v == c) for c in classes}
    for c, cases in per_class.items():
        if len(cases) < folds:
            raise ValueError(
                f"class {c!r} has {len(cases)} case(s); {folds} folds need at least {folds}"
            )
    fold_cases: list[list[str]] = [[] for _ in range(folds)]
    offset = 0
    for c in classes:
        cases = list(per_class[c])
        rng.shuffle(cases)
        for i, case in enumerate(cases):
            fold_cases[(i + offset) % folds].append(case)
        offset += len(cases)
    result = []
    for k in range(folds):
        test = set(fold_cases[k])
        rest = [c for c in sorted(case_label) if c not in test]
        val: list[str] = []
        for c in classes:
            pool = [x for x in rest if case_label[x] == c]
            rng.shuffle(pool)
            n = max(1, round(len(pool) * val_fraction)) if len(pool) > 1 else 0
            val += pool[:n]
        train = [c for c in rest if c not in val]

        def ids(cases: list[str] | set[str]) -> list[str]:
            return sorted(s for c in cases for s in by_case[c])

        result.append({"train": ids(train), "val": ids(val), "test": ids(test)})
    return {"classes": list(classes), "seed": seed, "folds": result, "unlabelled": unlabelled}


def load_bags_and_coords(
    features_dir: Path, slide_ids: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """Each slide's bag (N, D) and coords (N, 2) from one read of its features h5."""
    bags, coords = {}, {}
    for sid in slide_ids:
        path = features_dir / "features" / f"{sid}.h5"
        feats, coords[sid] = read_features(path)
        if len(feats) == 0:
            raise ValueError(f"{sid}: empty bag (0 patches) in {path}")
        bags[sid] = torch.from_numpy(feats)
    return bags, coords


def load_bags(features_dir: Path, slide_ids: list[str]) -> dict[str, torch.Tensor]:
    return load_bags_and_coords(features_dir, slide_ids)[0]


def _epoch_loss(
    model: CLAMBase, bags: dict[str, torch.Tensor], labels: dict[str, int], ids: list[str]
) -> float:
    model.eval()
    with torch.no_grad():
        losses = [
            F.cross_entropy(model(bags[s])["logits"], torch.tensor([labels[s]])).item() for s in ids
        ]
    return float(np.mean(losses)) if losses else float("nan")


def train_fold(
    bags: dict[str, torch.Tensor],
    labels: dict[str, int],
    train: list[str],
    val: list[str],
    n_classes: int,
    cfg: TrainMilParams,
    seed: int,
) -> tuple[CLAMBase, dict[str, Any]]:
    """Train one CLAM; returns the best (lowest validation loss) model and its history."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    in_dim = next(iter(bags.values())).shape[1]
    model = build_clam(in_dim, n_classes, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    counts = np.bincount([labels[s] for s in train], minlength=n_classes)
    weights = np.array([1.0 / counts[labels[s]] for s in train])
    weights /= weights.sum()
    best_loss, best_state, best_epoch, bad = float("inf"), None, 0, 0
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        total = 0.0
        for i in rng.choice(len(train), size=len(train), p=weights):
            s = train[i]
            out = model(bags[s], label=labels[s])
            bag_loss = F.cross_entropy(out["logits"], torch.tensor([labels[s]]))
            loss = cfg.bag_weight * bag_loss + (1 - cfg.bag_weight) * out["instance_loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        val_loss = _epoch_loss(model, bags, labels, val) if val else total / max(len(train), 1)
        history.append(
            {"epoch": epoch + 1, "train_loss": total / max(len(train), 1), "val_loss": val_loss}
        )
        if val_loss < best_loss:
            best_loss, best_epoch, bad = val_loss, epoch + 1, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if epoch + 1 >= cfg.min_epochs and bad >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), {"best_epoch": best_epoch, "best_val_loss": best_loss, "history": history}


def predict_slides(
    model: nn.Module,
    bags: dict[str, torch.Tensor],
    ids: list[str],
    labels: dict[str, int],
    fold: int,
    classes: tuple[str, ...],
) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Prediction rows (slide_id, fold, label, prob_<class>...) and the attention (N,) of each
    slide."""
    rows, attention = [], {}
    with torch.no_grad():
        for s in ids:
            out = model(bags[s])
            probs = out["probs"][0].numpy()
            rows.append(
                {
                    "slide_id": s,
                    "fold": fold,
                    "label": labels[s],
                    **{f"prob_{c}": float(p) for c, p in zip(classes, probs, strict=True)},
                }
            )
            attention[s] = out["attention"].numpy().astype(np.float32)
    return rows, attention


def train_mil(
    manifest: Manifest,
    features_dir: str | Path,
    splits: dict[str, Any],
    out_dir: str | Path,
    params: Params,
) -> dict[str, Any]:
    """Train one CLAM per fold; writes fold_<k>.pt, predictions.csv (out-of-fold) and
    summary.json, which counts the manifest's unlabelled slides (never trained on or tested).

    Raises:
        ValueError: the splits were made for other classes, or name a slide that has no label in
            the manifest.
    """
    cfg = params.train_mil
    classes = tuple(params.dataset.classes)
    if tuple(splits["classes"]) != classes:
        raise ValueError(
            f"splits were made for classes {splits['classes']}, params say {list(classes)}"
        )
    features_dir, out = Path(features_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = manifest.labels(classes)
    needed = sorted({s for f in splits["folds"] for part in f.values() for s in part})
    if missing := [s for s in needed if s not in labels]:
        raise ValueError(
            f"splits name slide(s) that are not labelled slides of {manifest.path}: {missing[:5]}; "
            "re-run splits with this manifest"
        )
    unlabelled = len(manifest.unlabelled)
    if unlabelled:
        log.info("train-mil: %d unlabelled slide(s) left out", unlabelled)
    bags = load_bags(features_dir, needed)
    rows, attention, folds = [], {}, []
    for k, fold in enumerate(tqdm(splits["folds"], desc="train-mil", unit="fold", disable=None)):
        model, info = train_fold(
            bags, labels, fold["train"], fold["val"], len(classes), cfg, params.seed + k
        )
        save_clam(out / f"fold_{k}.pt", model, {"fold": k, "classes": list(classes)})
        fold_rows, fold_attention = predict_slides(model, bags, fold["test"], labels, k, classes)
        rows += fold_rows
        attention.update(fold_attention)
        folds.append({"fold": k, **info})
        log.info(
            "fold %d: best epoch %d, val loss %.4f", k, info["best_epoch"], info["best_val_loss"]
        )
    write_predictions(out, rows, attention)
    summary = {
        "classes": list(classes),
        "feature_dim": int(next(iter(bags.values())).shape[1]),
        "folds": folds,
        "unlabelled": unlabelled,
    }
    save_json(out / "summary.json", summary)
    return summary
