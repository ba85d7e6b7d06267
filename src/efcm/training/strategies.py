"""The EFCM slide-level strategies on top of a distilled student, fold by fold.

- `reuse` (Reuse CLAM): the teacher-feature CLAM of each fold, unchanged, on the student's projected
  features. Only a student that outputs the teacher's space (VFD, FPD) can be reused; the
  configuration refuses `reuse` with MCM-KD.
- `retrain` (Retrain CLAM): a new CLAM on the frozen student's features
  (`efcm.training.mil.train_mil`).
- `etc` (End2end Train CLAM): per fold, an information-bottleneck head on the teacher features picks
  each training slide's top-K patches; the student and a CLAM are trained end to end on those bags
  (patch pixels re-read from the slides, or with `store.enabled` from the patch-shard store
  through its index, flips / 90-degree rotations / mild colour jitter; the
  student's early stages and every BatchNorm statistic frozen; AdamW with a backbone learning rate
  `backbone_lr_factor` below the head's; mixed precision on CUDA; patches embedded in chunks under
  gradient checkpointing, so a 512-patch bag fits in 16 GB); then the fine-tuned student re-extracts
  every patch of the fold's slides and a new CLAM is trained on those features.

Each strategy writes what `train_mil` writes: fold_<k>.pt, predictions.csv (out-of-fold),
attention.h5, summary.json (with the selected fold), so evaluation and export read them alike;
ETC also writes its fine-tuned students (student_fold_<k>.pt) and the IB selection of each fold
(fold_<k>/topk/<slide_id>.h5: indices, coords, keep probabilities).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from efcm.config import ConfigError, EtcParams, Params
from efcm.features import embed_batches
from efcm.io.cache import SlideCache
from efcm.io.files import save_json
from efcm.io.manifest import Manifest, read_manifest
from efcm.io.results import read_summary, write_predictions
from efcm.io.store import require_store
from efcm.models.clam import build_clam, load_clam, save_clam
from efcm.models.encoders import PatchTransform
from efcm.models.freeze import freeze_batchnorm, freeze_stages
from efcm.models.students import load_student, save_student
from efcm.registry import StrategyInputs
from efcm.slides.patches import SlidePatches, StorePatches, open_patches
from efcm.slides.patching import read_coords
from efcm.training.mil import load_bags, load_bags_and_coords, predict_slides, train_fold, train_mil

log = logging.getLogger(__name__)


def reuse(
    manifest: Manifest,
    teacher_mil_dir: str | Path,
    student_features_dir: str | Path,
    splits: dict[str, Any],
    out_dir: str | Path,
    params: Params,
) -> dict[str, Any]:
    """The teacher's fold CLAMs applied unchanged to the student's features of each test fold."""
    teacher_mil_dir, out = Path(teacher_mil_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = tuple(params.dataset.classes)
    labels = manifest.labels(classes)
    tested = sorted({s for f in splits["folds"] for s in f["test"]})
    bags = load_bags(Path(student_features_dir), tested)
    rows, attention = [], {}
    for k, fold in enumerate(splits["folds"]):
        clam = load_clam(teacher_mil_dir / f"fold_{k}.pt")
        dim = next(iter(bags.values())).shape[1]
        if clam.in_dim != dim:
            raise ConfigError(
                f"reuse: the teacher's CLAM takes {clam.in_dim}-d features but the student gives "
                f"{dim}-d: only a student in the teacher's space (distill.method vfd or fpd) can "
                "reuse it"
            )
        shutil.copy2(teacher_mil_dir / f"fold_{k}.pt", out / f"fold_{k}.pt")
        fold_rows, fold_attention = predict_slides(clam, bags, fold["test"], labels, k, classes)
        rows += fold_rows
        attention.update(fold_attention)
    write_predictions(out, rows, attention)
    summary = read_summary(teacher_mil_dir)  # the teacher's folds, reused as they are
    save_json(out / "summary.json", summary)
    return summary


# -- ETC ------------------------------------------------------------------------------------------


def augment(patches: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """uint8 (N, S, S, 3): per patch a random flip, a random 90-degree rotation, and a mild
    per-channel brightness jitter of +-`jitter`."""
    out = np.empty_like(patches)
    for i, p in enumerate(patches):
        if rng.random() < 0.5:
            p = p[:, ::-1]
        p = np.rot90(p, int(rng.integers(4)))
        if jitter > 0:
            gain = 1 + rng.uniform(-jitter, jitter, 3)
            p = np.clip(p.astype(np.float32) * gain, 0, 255)
        out[i] = p
    return out


def _embed(
    student: nn.Module, transform: PatchTransform, patches: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Student features of a bag (N, S, S, 3) uint8 -> (N, D), chunk by chunk under gradient
    checkpointing (activations of one chunk at a time)."""
    feats = []
    for i in range(0, len(patches), chunk):
        x = transform(patches[i : i + chunk])
        if torch.is_grad_enabled():
            feats.append(checkpoint(student, x, use_reentrant=False))
        else:
            feats.append(student(x))
    return torch.cat(feats)


def train_etc_fold(
    student: nn.Module,
    spec: Any,
    slides: dict[str, SlidePatches | StorePatches],
    topk: dict[str, np.ndarray],
    labels: dict[str, int],
    train: list[str],
    params: Params,
    seed: int,
    device: torch.device,
) -> nn.Module:
    """Fine-tune `student` end to end with a fresh CLAM on the top-K bags of the training slides;
    returns the fine-tuned student (eval mode)."""
    cfg: EtcParams = params.mil.etc
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    trainable = freeze_stages(student, cfg.freeze_stages)
    freeze_batchnorm(student)
    if not trainable:
        raise ValueError("ETC: every student parameter is frozen (lower mil.etc.freeze_stages)")
    clam = build_clam(student.out_dim, len(params.dataset.classes), params.train_mil).to(device)
    transform = PatchTransform(spec).to(device)
    student.to(device)
    head_lr = cfg.lr
    opt = torch.optim.AdamW(
        [
            {
                "params": [p for p in student.parameters() if p.requires_grad],
                "lr": head_lr * cfg.backbone_lr_factor,
            },
            {"params": clam.parameters(), "lr": head_lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    amp = device.type == "cuda"
    dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dtype == torch.float16)
    counts = np.bincount([labels[s] for s in train], minlength=len(params.dataset.classes))
    weights = np.array([1.0 / counts[labels[s]] for s in train])
    weights /= weights.sum()
    bag_weight = params.train_mil.bag_weight
    for epoch in range(cfg.epochs):
        clam.train()
        student.train()
        freeze_batchnorm(student)
        opt.zero_grad(set_to_none=True)
        order = rng.choice(len(train), size=len(train), p=weights)
        for step, i in enumerate(
            tqdm(order, desc=f"etc {epoch + 1}/{cfg.epochs}", disable=None, leave=False)
        ):
            s = train[i]
            pixels = slides[s].read_batch(topk[s])
            if cfg.augment:
                pixels = augment(pixels, rng, cfg.colour_jitter)
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                out = clam(_embed(student, transform, x, cfg.chunk).float(), label=labels[s])
                loss = (
                    bag_weight
                    * F.cross_entropy(out["logits"], torch.tensor([labels[s]], device=device))
                    + (1 - bag_weight) * out["instance_loss"]
                )
            scaler.scale(loss / cfg.accumulate).backward()
            if (step + 1) % cfg.accumulate == 0 or step + 1 == len(order):
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
    return student.eval()


def etc(
    manifest: Manifest,
    patches_dir: str | Path,
    teacher_features_dir: str | Path,
    student_ckpt: str | Path,
    splits: dict[str, Any],
    out_dir: str | Path,
    params: Params,
    *,
    device: str | None = None,
    cache: SlideCache | None = None,
) -> dict[str, Any]:
    """End2end Train CLAM, fold by fold (see the module docstring); gs:// slides are staged into
    `cache`."""
    from efcm.training.ib import read_top_k, train_ib, write_top_k

    patches_dir, out = Path(patches_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    classes = tuple(params.dataset.classes)
    labels = manifest.labels(classes)
    by_id = {s.slide_id: s for s in manifest.slides}
    needed = sorted({s for f in splits["folds"] for part in f.values() for s in part})
    teacher_bags, coords = load_bags_and_coords(Path(teacher_features_dir), needed)
    # with the store, the top-K pixels are read through its index: no slide is opened
    store_dir = require_store(teacher_features_dir) if params.store.enabled else None
    slides = {
        s: open_patches(
            s,
            by_id[s].uri,
            read_coords(patches_dir / "patches" / f"{s}.h5"),
            manifest.base_dir,
            cache,
            store_dir,
        )
        for s in needed
    }
    rows, attention, folds = [], {}, []
    for k, fold in enumerate(splits["folds"]):
        seed = params.seed + 100 * k
        ib = train_ib(teacher_bags, labels, fold["train"], len(classes), params.ib, seed)
        topk = {}  # written to fold_<k>/topk/<slide_id>.h5: which patches ETC trained on
        for s in fold["train"]:
            path = write_top_k(ib, s, teacher_bags[s], coords[s], out / f"fold_{k}", params.ib.k)
            topk[s] = read_top_k(path)[0]
        student, spec = load_student(student_ckpt)
        student = train_etc_fold(
            copy.deepcopy(student), spec, slides, topk, labels, fold["train"], params, seed, dev
        )
        save_student(out / f"student_fold_{k}.pt", student.cpu(), spec)
        encoder = nn.Sequential(PatchTransform(spec), student).to(dev).eval()
        bags = {}
        for s in fold["train"] + fold["val"] + fold["test"]:
            sp = slides[s]
            batches = (
                torch.from_numpy(sp.read_batch(range(i, min(i + 64, len(sp)))))
                for i in range(0, len(sp), 64)
            )
            bags[s] = torch.from_numpy(embed_batches(encoder, batches, total=len(sp), desc=s))
        model, info = train_fold(
            bags, labels, fold["train"], fold["val"], len(classes), params.train_mil, seed
        )
        save_clam(out / f"fold_{k}.pt", model, {"fold": k, "classes": list(classes)})
        fold_rows, fold_attention = predict_slides(model, bags, fold["test"], labels, k, classes)
        rows += fold_rows
        attention.update(fold_attention)
        folds.append({"fold": k, **info})
    write_predictions(out, rows, attention)
    summary = {
        "classes": list(classes),
        "feature_dim": int(next(iter(bags.values())).shape[1]),
        "folds": folds,
    }
    save_json(out / "summary.json", summary)
    return summary


# -- the registry's runners (efcm.registry.STRATEGIES): one signature for every strategy; the
# stage (efcm.stages.strategy) stamps the strategy's name into the summary.json they write ------


def _splits(inputs: StrategyInputs) -> dict[str, Any]:
    return json.loads(Path(inputs.splits).read_text())


def _manifest(inputs: StrategyInputs, params: Params) -> Manifest:
    return read_manifest(inputs.manifest, params.dataset.classes)


def run_reuse(
    inputs: StrategyInputs, out_dir: str | Path, params: Params, *, cache: SlideCache | None = None
) -> dict[str, Any]:
    """Reuse CLAM: reads features only (`cache` is not needed)."""
    return reuse(
        _manifest(inputs, params),
        inputs.teacher_mil,
        inputs.student_features,
        _splits(inputs),
        out_dir,
        params,
    )


def run_retrain(
    inputs: StrategyInputs, out_dir: str | Path, params: Params, *, cache: SlideCache | None = None
) -> dict[str, Any]:
    """Retrain CLAM: reads features only (`cache` is not needed)."""
    return train_mil(
        _manifest(inputs, params), inputs.student_features, _splits(inputs), out_dir, params
    )


def run_etc(
    inputs: StrategyInputs, out_dir: str | Path, params: Params, *, cache: SlideCache | None = None
) -> dict[str, Any]:
    return etc(
        _manifest(inputs, params),
        inputs.patches,
        inputs.teacher_features,
        inputs.student,
        _splits(inputs),
        out_dir,
        params,
        cache=cache,
    )
