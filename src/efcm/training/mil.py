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
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from efcm.config import Params, TrainMilParams
from efcm.errors import InvalidInput
from efcm.features import read_features
from efcm.io.files import save_json
from efcm.io.manifest import Manifest
from efcm.io.results import write_predictions
from efcm.models.clam import CLAMBase, build_clam, save_clam

log = logging.getLogger(__name__)


def split_cases(
    items: Mapping[str, list[str]],
    stratum: Mapping[str, str],
    strata: Sequence[str],
    folds: int,
    val_fraction: float,
    seed: int,
) -> list[dict[str, list[str]]]:
    """Patient-level stratified k-fold over cases: the cases of each stratum (in `strata`
    order) are shuffled and dealt to the folds in turn, continuing where the previous stratum
    stopped; in each fold, a share `val_fraction` of the remaining cases of each stratum (at least
    one where the stratum has two or more) is held out for early stopping.

    Args:
        items: case_id -> its item ids (slides, images).
        stratum: case_id -> its stratum (a slide's class; an image case's rarest class).
        strata: every stratum, in dealing order.

    Returns:
        one {"train", "val", "test"} per fold, each a sorted list of item ids; a case's items
        are always in the same part.
    """
    rng = np.random.default_rng(seed)
    per_stratum = {c: sorted(k for k, v in stratum.items() if v == c) for c in strata}
    fold_cases: list[list[str]] = [[] for _ in range(folds)]
    offset = 0
    for c in strata:
        cases = list(per_stratum[c])
        rng.shuffle(cases)
        for i, case in enumerate(cases):
            fold_cases[(i + offset) % folds].append(case)
        offset += len(cases)
    result = []
    for k in range(folds):
        test = set(fold_cases[k])
        rest = [c for c in sorted(stratum) if c not in test]
        val: list[str] = []
        for c in strata:
            pool = [x for x in rest if stratum[x] == c]
            rng.shuffle(pool)
            n = max(1, round(len(pool) * val_fraction)) if len(pool) > 1 else 0
            val += pool[:n]
        train = [c for c in rest if c not in val]

        def ids(cases: list[str] | set[str]) -> list[str]:
            return sorted(s for c in cases for s in items[c])

        result.append({"train": ids(train), "val": ids(val), "test": ids(test)})
    return result


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
    for c in classes:
        n = sum(1 for v in case_label.values() if v == c)
        if n < folds:
            raise ValueError(f"class {c!r} has {n} case(s); {folds} folds need at least {folds}")
    result = split_cases(by_case, case_label, classes, folds, val_fraction, seed)
    return {"classes": list(classes), "seed": seed, "folds": result, "unlabelled": unlabelled}


#: The bytes of bags a `FeatureBags` keeps in memory (least recently used first out): a few
#: cohort-scale bags (10,000 patches x 512 float32 is 20 MB), and every bag of a small cohort, so
#: the demo reads each file once.
BAG_CACHE_BYTES = 256 * 2**20


class FeatureBags(Mapping[str, torch.Tensor]):
    """slide_id -> bag (N, D) float32 tensor, read on access from ``<features_dir>/features/
    <slide_id>.h5`` (`read_features`), so memory holds about one bag at a time, not the cohort.

    A small LRU keeps the most recently read bags up to `cache_bytes` (at least the last one);
    a bag is read again once it has been evicted. Construction opens each file's header only, to
    fail early on a missing file or an empty bag and to know each bag's shape.

    Raises:
        FileNotFoundError: a slide has no features file.
        InvalidInput: a file has no features dataset.
        ValueError: a slide's bag is empty (0 patches).
    """

    def __init__(
        self, features_dir: str | Path, slide_ids: list[str], cache_bytes: int = BAG_CACHE_BYTES
    ) -> None:
        self.features_dir = Path(features_dir)
        self.cache_bytes = cache_bytes
        self._shapes: dict[str, tuple[int, int]] = {}
        for sid in slide_ids:
            path = self.path(sid)
            if not path.is_file():
                raise FileNotFoundError(f"{sid}: no features file {path}")
            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise InvalidInput(f"{path}: no 'features' dataset")
                shape = tuple(int(n) for n in f["features"].shape)
            if len(shape) != 2 or shape[0] == 0:
                raise ValueError(f"{sid}: empty bag (0 patches) in {path}")
            self._shapes[sid] = (shape[0], shape[1])
        self._cache: OrderedDict[str, tuple[torch.Tensor, np.ndarray]] = OrderedDict()
        self._held = 0

    def path(self, slide_id: str) -> Path:
        return self.features_dir / "features" / f"{slide_id}.h5"

    def _read(self, slide_id: str) -> tuple[torch.Tensor, np.ndarray]:
        if slide_id not in self._shapes:
            raise KeyError(slide_id)
        if slide_id in self._cache:
            self._cache.move_to_end(slide_id)
            return self._cache[slide_id]
        feats, coords = read_features(self.path(slide_id))
        entry = (torch.from_numpy(feats), coords)
        self._cache[slide_id] = entry
        self._held += feats.nbytes + coords.nbytes
        while len(self._cache) > 1 and self._held > self.cache_bytes:
            _, (f, c) = self._cache.popitem(last=False)
            self._held -= f.numpy().nbytes + c.nbytes
        return entry

    def __getitem__(self, slide_id: str) -> torch.Tensor:
        return self._read(slide_id)[0]

    def coords(self, slide_id: str) -> np.ndarray:
        """The slide's coords (N, 2) int64, from the same read as its bag."""
        return self._read(slide_id)[1]

    def n_patches(self, slide_id: str) -> int:
        return self._shapes[slide_id][0]

    @property
    def resident(self) -> list[str]:
        """The slides whose bags are in memory now, least recently used first."""
        return list(self._cache)

    @property
    def dim(self) -> int:
        """The feature dimension (of the first slide)."""
        return next(iter(self._shapes.values()))[1]

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)


def load_bags(features_dir: Path, slide_ids: list[str]) -> FeatureBags:
    """The slides' bags, read on access (see `FeatureBags`)."""
    return FeatureBags(features_dir, slide_ids)


def _epoch_loss(
    model: CLAMBase, bags: Mapping[str, torch.Tensor], labels: dict[str, int], ids: list[str]
) -> float:
    model.eval()
    with torch.no_grad():
        losses = [
            F.cross_entropy(model(bags[s])["logits"], torch.tensor([labels[s]])).item() for s in ids
        ]
    return float(np.mean(losses)) if losses else float("nan")


class EarlyStopping:
    """Early stopping on the validation loss: `step` records each epoch, keeps a copy of the
    model's state at the lowest validation loss so far, and says when to stop (`patience` epochs
    without a lower loss, once `min_epochs` have run); `finish` puts the best state back."""

    def __init__(self, min_epochs: int, patience: int) -> None:
        self.min_epochs, self.patience = min_epochs, patience
        self.best_loss, self.best_epoch, self.bad = float("inf"), 0, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, Any]] = []

    def step(self, model: nn.Module, epoch: int, train_loss: float, val_loss: float) -> bool:
        """Record epoch `epoch` (1-based); True when training should stop."""
        self.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad = val_loss, epoch, 0
            self.best_state = {k: v.clone() for k, v in model.state_dict().items()}
            return False
        self.bad += 1
        return epoch >= self.min_epochs and self.bad >= self.patience

    def finish(self, model: nn.Module) -> dict[str, Any]:
        """Load the best state into `model` (eval mode); its best epoch, loss and history."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        model.eval()
        return {
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_loss,
            "history": self.history,
        }


def train_fold(
    bags: Mapping[str, torch.Tensor],
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
    stopping = EarlyStopping(cfg.min_epochs, cfg.patience)
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
        if stopping.step(model, epoch + 1, total / max(len(train), 1), val_loss):
            break
    info = stopping.finish(model)
    return model, info


def predict_slides(
    model: nn.Module,
    bags: Mapping[str, torch.Tensor],
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
        "feature_dim": bags.dim,
        "folds": folds,
        "unlabelled": unlabelled,
    }
    save_json(out / "summary.json", summary)
    return summary
