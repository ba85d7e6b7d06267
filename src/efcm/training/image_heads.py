"""Image-level strategies on features: the twins of the slide strategies for image tasks
(RETFound fundus, MRM chest X-ray), fold by fold on patient-level splits.

- the teacher baseline, `train_heads` on the teacher's features: the RETFound / MRM linear probe
  (features standardised with the training split's mean and std, one linear layer, cross-entropy
  for a multi-class task, BCE with logits for a multi-label one, AdamW, early stopping on the
  validation loss with the best epoch kept; `efcm.models.image_head.LinearHead`);
- Reuse, `reuse_heads`: the teacher's fold heads, unchanged (their standardisation included), on
  the student's projected features: only for a student in the teacher's space (VFD, FPD);
- Retrain, `train_heads` on the frozen student's features: a new head per fold.

Features come as an array (N, D) with the image id of each row (`image_features`), so the code
that reads the feature files stays thin. Splits (`image_splits`) reuse the slide path's
patient-level dealing (`efcm.training.mil.split_cases`): a case's images never cross folds.

Each strategy writes what the slide strategies write: fold_<k>.pt (the head), predictions.csv
(the out-of-fold test predictions: image_id, fold, the label, prob_<class>...), summary.json (the
folds, each with its best epoch), and val_predictions.csv: each fold's predictions on its own
validation images, in the same layout, where evaluation picks the multi-label thresholds (never
on the test images). A multi-label label is written multi-hot, one 0/1 `label_<class>` column
per class, next to the `prob_<class>` columns.
"""

from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from efcm import registry
from efcm.config import ConfigError, ImageHeadParams, Params
from efcm.io.cache import SlideCache
from efcm.io.files import save_json
from efcm.io.image_manifest import ImageManifest, LabelSpace
from efcm.io.results import VAL_PREDICTIONS, read_summary, write_predictions
from efcm.models.image_head import LinearHead, load_head, save_head
from efcm.training.mil import EarlyStopping, split_cases

log = logging.getLogger(__name__)


def image_splits(
    manifest: ImageManifest,
    space: LabelSpace,
    folds: int,
    val_fraction: float,
    seed: int,
    available: set[str] | None = None,
) -> dict[str, Any]:
    """Patient-level k-fold over the labelled images, in the layout of `mil.make_splits`.

    The images of one case (both eyes, several views) may carry different labels, so a case is
    stratified by the rarest class (fewest cases) that any of its images shows, or by
    `space.none_label` when none shows a class (a multi-label "no finding" case): the cases of
    each stratum are dealt to the folds in turn (`split_cases`). Every case showing a rare class
    is thus spread over the folds; a more common class that the same cases also show is spread
    only as far as the rarer strata allow, so its share per fold is balanced approximately.

    Args:
        manifest: the image manifest (its unlabelled images are left out and listed).
        space: the task's label space.
        available: restrict to these image ids (e.g. those whose features were extracted).

    Raises:
        ValueError: a label the space does not allow, or a class shown by fewer cases than
            folds (some test fold would have none).
    """
    considered = [e for e in manifest.images if available is None or e.image_id in available]
    unlabelled = sorted(e.image_id for e in considered if not e.labelled)
    labels = manifest.labels(space)
    items: dict[str, list[str]] = defaultdict(list)
    shown: dict[str, set[int]] = defaultdict(set)
    for e in considered:
        if e.labelled:
            items[e.case_id].append(e.image_id)
            shown[e.case_id].update(labels[e.image_id])
    cases_with = [sum(1 for s in shown.values() if c in s) for c in range(len(space.classes))]
    for c, n in zip(space.classes, cases_with, strict=True):
        if n < folds:
            raise ValueError(
                f"class {c!r} is shown by {n} case(s); {folds} folds need at least {folds}"
            )
    rarity = sorted(range(len(space.classes)), key=lambda c: (cases_with[c], c))
    stratum = {
        case: space.classes[min(s, key=rarity.index)] if s else space.none_label
        for case, s in shown.items()
    }
    strata = [space.classes[c] for c in rarity] + [space.none_label]
    return {
        "classes": list(space.classes),
        "multi_label": space.multi_label,
        "seed": seed,
        "stratified_by": "the rarest class shown by any image of the case",
        "folds": split_cases(items, stratum, strata, folds, val_fraction, seed),
        "unlabelled": unlabelled,
    }


@dataclass(frozen=True)
class ImageFeatures:
    """Features of images, row i = image `ids[i]`, with the manifest and label space that label
    them: what every image strategy on features takes. Build it with `image_features`."""

    x: torch.Tensor  # (N, D) float32
    ids: tuple[str, ...]
    manifest: ImageManifest
    space: LabelSpace

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def part(self, images: list[str], what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (n, D), targets) of `images`: targets (n,) long class indices, or (n, C)
        float multi-hot for a multi-label task.

        Raises:
            ValueError: an image without features, or without a label in the manifest.
        """
        index = {s: i for i, s in enumerate(self.ids)}
        missing = [s for s in images if s not in index]
        if missing:
            raise ValueError(
                f"{what}: no features for {len(missing)} image(s) of the splits ({missing[:5]}); "
                "extract every image the splits name, or re-run the splits on the extracted images"
            )
        y = image_targets(self.manifest, self.space, images, what)
        return self.x[[index[s] for s in images]], y


def image_targets(
    manifest: ImageManifest, space: LabelSpace, images: list[str], what: str
) -> torch.Tensor:
    """The targets of `images`: (n,) long class indices, or (n, C) float multi-hot for a
    multi-label task.

    Raises:
        ValueError: an image without a label in the manifest (named, with `what`).
    """
    t = manifest.targets(space)
    unlabelled = [s for s in images if s not in t]
    if unlabelled:
        raise ValueError(
            f"{what}: splits name image(s) that are not labelled images of "
            f"{manifest.path}: {unlabelled[:5]}; re-run the splits with this manifest"
        )
    if space.multi_label:
        hot = np.zeros((len(images), len(space.classes)), np.float32)
        for i, s in enumerate(images):
            hot[i] = t[s]
        return torch.from_numpy(hot)
    return torch.tensor([int(t[s]) for s in images], dtype=torch.long)


def image_features(
    features: np.ndarray, ids: list[str], manifest: ImageManifest, space: LabelSpace
) -> ImageFeatures:
    """Check and wrap features (N, D), row i = image `ids[i]`.

    Raises:
        ValueError: the features are not (N, D) for N ids, or an id is listed twice.
    """
    x = np.asarray(features, np.float32)
    if x.ndim != 2 or len(x) != len(ids):
        raise ValueError(
            f"features must be (N, D) with one row per image id; got {list(x.shape)} for "
            f"{len(ids)} ids"
        )
    if len(set(ids)) != len(ids):
        raise ValueError("features: an image id is listed more than once")
    return ImageFeatures(torch.from_numpy(np.ascontiguousarray(x)), tuple(ids), manifest, space)


def head_loss(logits: torch.Tensor, y: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Cross-entropy on class indices, or BCE with logits on multi-hot targets."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, y)
    return F.cross_entropy(logits, y)


def fit_head(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    n_classes: int,
    multi_label: bool,
    cfg: ImageHeadParams,
    seed: int,
) -> tuple[LinearHead, dict[str, Any]]:
    """A linear head on (N, D) features: standardised with the training rows' mean and std,
    trained with AdamW on shuffled mini-batches; returns the head of the lowest validation loss
    (the training loss when there are no validation rows) and its history."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head = LinearHead(x_train.shape[1], n_classes, multi_label)
    head.standardise_with(x_train)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    stopping = EarlyStopping(cfg.min_epochs, cfg.patience)
    for epoch in range(cfg.epochs):
        head.train()
        total = 0.0
        for batch in torch.randperm(len(x_train), generator=gen).split(cfg.batch_size):
            loss = head_loss(head(x_train[batch]), y_train[batch], multi_label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        train_loss = total / max(len(x_train), 1)
        head.eval()
        with torch.no_grad():
            val_loss = (
                head_loss(head(x_val), y_val, multi_label).item() if len(x_val) else train_loss
            )
        if stopping.step(head, epoch + 1, train_loss, val_loss):
            break
    info = stopping.finish(head)
    return head, info


def prediction_rows(
    head: LinearHead,
    x: torch.Tensor,
    y: torch.Tensor,
    ids: list[str],
    fold: int,
    space: LabelSpace,
) -> list[dict[str, Any]]:
    """One row per image: image_id, fold, the label (`label`, or multi-hot `label_<class>`),
    prob_<class>... (softmax, or a sigmoid per class)."""
    with torch.no_grad():
        probs = head.probabilities(x).numpy() if len(ids) else np.zeros((0, len(space.classes)))
    rows = []
    for i, s in enumerate(ids):
        if space.multi_label:
            label = {
                f"label_{c}": int(v) for c, v in zip(space.classes, y[i].tolist(), strict=True)
            }
        else:
            label = {"label": int(y[i])}
        rows.append(
            {
                "image_id": s,
                "fold": fold,
                **label,
                **{f"prob_{c}": float(p) for c, p in zip(space.classes, probs[i], strict=True)},
            }
        )
    return rows


def write_predictions_pair(
    out: Path, test_rows: list[dict[str, Any]], val_rows: list[dict[str, Any]]
) -> None:
    """predictions.csv (the test rows) and val_predictions.csv (the validation rows)."""
    write_predictions(out, test_rows)
    # written even without rows (no stratum had two cases left for validation): evaluation
    # then gives every class of every fold the fallback threshold
    write_predictions(out, val_rows, name=VAL_PREDICTIONS, fields=list(test_rows[0]))


def check_splits(splits: dict[str, Any], space: LabelSpace) -> None:
    """Raises ValueError when the splits were made for another task's classes."""
    if tuple(splits["classes"]) != space.classes:
        raise ValueError(
            f"splits were made for classes {splits['classes']}, the task has {list(space.classes)}"
        )


Part = tuple[torch.Tensor, torch.Tensor]
FitFold = Callable[[int, dict[str, list[str]]], tuple[LinearHead, dict[str, Any], dict[str, Part]]]
"""fit(k, fold) -> (the fold's head, its record for summary.json, the (features, targets) of
the fold's "test" and "val" images that the head predicts)."""


def run_folds(
    splits: dict[str, Any],
    space: LabelSpace,
    out_dir: str | Path,
    fit: FitFold,
    unlabelled: int,
) -> dict[str, Any]:
    """The fold loop of every image strategy that trains a head: per fold `fit`, then the head
    (fold_<k>.pt) and its test and validation predictions; then predictions.csv,
    val_predictions.csv and summary.json (`unlabelled`: how many images of the manifest have no
    label).

    Raises:
        ValueError: the splits were made for other classes.
    """
    check_splits(splits, space)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_rows: list[dict[str, Any]] = []
    val_rows: list[dict[str, Any]] = []
    folds, dim = [], 0
    for k, fold in enumerate(splits["folds"]):
        head, info, parts = fit(k, fold)
        dim = head.in_dim
        save_head(out / f"fold_{k}.pt", head, {"fold": k, "classes": list(space.classes)})
        test_rows += prediction_rows(head, *parts["test"], fold["test"], k, space)
        val_rows += prediction_rows(head, *parts["val"], fold["val"], k, space)
        folds.append({"fold": k, **info})
        log.info(
            "fold %d: best epoch %d, val loss %.4f", k, info["best_epoch"], info["best_val_loss"]
        )
    write_predictions_pair(out, test_rows, val_rows)
    summary = {
        "classes": list(space.classes),
        "multi_label": space.multi_label,
        "feature_dim": dim,
        "folds": folds,
        "unlabelled": unlabelled,
    }
    save_json(out / "summary.json", summary)
    return summary


def train_heads(
    data: ImageFeatures,
    splits: dict[str, Any],
    out_dir: str | Path,
    cfg: ImageHeadParams,
    seed: int,
) -> dict[str, Any]:
    """A new linear head per fold on `data`'s features: the teacher's linear probe on teacher
    features, or Retrain on the student's. Writes fold_<k>.pt, predictions.csv,
    val_predictions.csv and summary.json (see the module docstring).

    Raises:
        ValueError: the splits were made for other classes, or name an image without features
            or without a label in the manifest.
    """
    space = data.space

    def fit(
        k: int, fold: dict[str, list[str]]
    ) -> tuple[LinearHead, dict[str, Any], dict[str, Part]]:
        parts = {p: data.part(fold[p], f"fold {k} {p}") for p in ("train", "val", "test")}
        head, info = fit_head(
            *parts["train"], *parts["val"], len(space.classes), space.multi_label, cfg, seed + k
        )
        return head, info, parts

    return run_folds(splits, space, out_dir, fit, len(data.manifest.unlabelled))


def reuse_heads(
    teacher_dir: str | Path,
    data: ImageFeatures,
    splits: dict[str, Any],
    out_dir: str | Path,
    method: str,
) -> dict[str, Any]:
    """Reuse: the teacher's fold heads (`train_heads` on teacher features, in `teacher_dir`),
    unchanged, on the student's projected features (`data`) of each fold's test and validation
    images.

    Raises:
        ConfigError: distillation `method` does not give a student in the teacher's space
            (MCM-KD), or the heads take another feature dimension than the student gives.
        ValueError: a head made for another label space.
    """
    # the registry's rule for the slide strategies that need the teacher's space, the slide Reuse
    refusals = (s.applies_to(method) for s in registry.STRATEGIES.values() if s.needs_teacher_space)
    if reason := next((r for r in refusals if r), None):
        raise ConfigError(f"reuse: {reason}")
    space = data.space
    check_splits(splits, space)
    teacher_dir, out = Path(teacher_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_rows: list[dict[str, Any]] = []
    val_rows: list[dict[str, Any]] = []
    for k, fold in enumerate(splits["folds"]):
        path = teacher_dir / f"fold_{k}.pt"
        head = load_head(path)
        if head.in_dim != data.dim:
            raise ConfigError(
                f"reuse: the teacher's head takes {head.in_dim}-d features but the student gives "
                f"{data.dim}-d: only a student in the teacher's space (distill.method vfd or "
                "fpd) can reuse it"
            )
        if head.n_classes != len(space.classes) or head.multi_label != space.multi_label:
            raise ValueError(
                f"{path}: a head for {head.n_classes} classes (multi_label {head.multi_label}), "
                f"the task has {len(space.classes)} (multi_label {space.multi_label})"
            )
        shutil.copy2(path, out / f"fold_{k}.pt")
        for part, rows in (("test", test_rows), ("val", val_rows)):
            x, y = data.part(fold[part], f"fold {k} {part}")
            rows += prediction_rows(head, x, y, fold[part], k, space)
    write_predictions_pair(out, test_rows, val_rows)
    summary = read_summary(teacher_dir)  # the teacher's folds, reused as they are
    save_json(out / "summary.json", summary)
    return summary


def read_features(
    features_dir: str | Path, manifest: ImageManifest, space: LabelSpace
) -> ImageFeatures:
    """The image features of an `efcm extract --kind image` output folder (or its features.h5),
    wrapped for the heads (`image_features`)."""
    from efcm.image_features import read_image_features

    f = read_image_features(features_dir)
    return image_features(f.features, f.image_ids, manifest, space)


@dataclass(frozen=True)
class ImageJob:
    """What an image strategy's runner (`efcm.registry.IMAGE_STRATEGIES`) is given: its input
    files, the image manifest, the splits, where to write, the params."""

    inputs: registry.ImageStrategyInputs
    images: ImageManifest
    splits: dict[str, Any]
    out_dir: Path
    params: Params
    cache: SlideCache | None = None  # stages gs:// images for a strategy that reads pixels

    def student_features(self) -> ImageFeatures:
        """The student's image features (`inputs.student_features`), wrapped for the heads."""
        path = self.inputs.student_features
        if path is None:
            raise ValueError("the student's image features are needed (--student-features)")
        return read_features(path, self.images, LabelSpace.of(self.params.image))


def run_retrain(job: ImageJob) -> dict[str, Any]:
    """Retrain: a new head per fold (`train_heads`) on the student's features."""
    p = job.params
    return train_heads(job.student_features(), job.splits, job.out_dir, p.image.head, p.seed)


def run_reuse(job: ImageJob) -> dict[str, Any]:
    """Reuse: the teacher probe's heads (`inputs.teacher_heads`) on the student's features."""
    teacher = job.inputs.teacher_heads
    if teacher is None:
        raise ValueError("reuse needs the teacher probe's output (--teacher-heads)")
    student = job.student_features()
    return reuse_heads(teacher, student, job.splits, job.out_dir, job.params.distill.method)
