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
  every patch of the fold's slides into fold_<k>/features/<slide_id>.h5 and a new CLAM is trained
  on those features, read one bag at a time (`FeatureBags`); the fold's features are removed once
  its CLAM and predictions are written.

ETC runs on one process, or on several under torchrun (`efcm strategy etc --nproc-per-node N`,
DDP-style data parallelism, gloo on the CPU, NCCL on CUDA): every rank draws the same epoch order
from the seed; each optimiser step's `mil.etc.accumulate` bags (which must divide by the number of
processes) are cut into one consecutive part per rank, and the ranks' gradients are summed before
the step (`sum_gradients`), so a step is the single process's step split across the ranks. The
re-extraction is split across the ranks balanced by patch count, each rank writing its slides'
files; rank 0 alone trains the IB head and each fold's CLAM and writes every output.

Each strategy writes what `train_mil` writes: fold_<k>.pt, predictions.csv (out-of-fold),
attention.h5, summary.json (with the selected fold), so evaluation and export read them alike;
ETC also writes its fine-tuned students (student_fold_<k>.pt), the IB selection of each fold
(fold_<k>/topk/<slide_id>.h5: indices, coords, keep probabilities), and which rank trained on and
re-extracted which slides (fold_<k>/ranks.json; the counts also in summary.json's folds, `etc`).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from efcm.config import ConfigError, EtcParams, ExtractParams, Params
from efcm.features import extract_slide, write_features
from efcm.io.cache import SlideCache
from efcm.io.files import save_json
from efcm.io.manifest import Manifest, read_manifest
from efcm.io.prefetch import prefetched
from efcm.io.results import read_summary, write_predictions
from efcm.io.store import assign_shards, require_store
from efcm.models.clam import build_clam, load_clam, save_clam
from efcm.models.encoders import PatchTransform
from efcm.models.freeze import freeze_batchnorm
from efcm.models.students import load_student, save_student
from efcm.registry import StrategyInputs
from efcm.slides.patches import SlidePatches, StorePatches, open_patches
from efcm.slides.patching import read_coords
from efcm.training.distributed import World, check_world, rank_bounds, sum_gradients
from efcm.training.end2end import (
    augment,
    augment_draws,
    freeze_student,
    mixed_precision,
    two_rate_adamw,
)
from efcm.training.mil import FeatureBags, load_bags, predict_slides, train_fold, train_mil

log = logging.getLogger(__name__)

#: How long ETC's ranks wait in a collective for the others (torch's default is 10 minutes for
#: NCCL): ranks above 0 wait there while rank 0 alone trains each fold's IB head and CLAM, which
#: takes hours on a cohort of 10,000 slides.
ETC_COLLECTIVE_TIMEOUT = timedelta(hours=12)


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
        dim = bags.dim
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
    *,
    world: World | None = None,
    history: list[dict[str, Any]] | None = None,
) -> nn.Module:
    """Fine-tune `student` end to end with a fresh CLAM on the top-K bags of the training slides;
    returns the fine-tuned student (eval mode).

    Each optimiser step takes `mil.etc.accumulate` consecutive bags of the epoch's order; in a
    `world` of several ranks, rank r trains on its consecutive part of them and the gradients are
    summed over the ranks before the step (see the module docstring). `history`, when given, gets
    per epoch the slides each rank trained on: {"epoch", "ranks": [[slide_id, ...], ...]}.

    Raises:
        ConfigError: mil.etc.accumulate does not divide by the world's size, or a fold has fewer
            training slides than processes.
    """
    cfg: EtcParams = params.mil.etc
    world = world or World()
    check_world(cfg.accumulate, world.size, "mil.etc.accumulate")
    if len(train) < world.size:  # a rank without any bag would never take a step's scale
        raise ConfigError(
            f"ETC: {len(train)} training slide(s) in a fold cannot be shared by {world.size} "
            "processes (at least one each)"
        )
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    freeze_student(student, cfg.freeze_stages, "mil.etc.freeze_stages")
    clam = build_clam(student.out_dim, len(params.dataset.classes), params.train_mil).to(device)
    transform = PatchTransform(spec).to(device)
    student.to(device)
    opt = two_rate_adamw(
        student, clam.parameters(), cfg.lr, cfg.backbone_lr_factor, cfg.weight_decay
    )
    amp, dtype, scaler = mixed_precision(device)
    counts = np.bincount([labels[s] for s in train], minlength=len(params.dataset.classes))
    weights = np.array([1.0 / counts[labels[s]] for s in train])
    weights /= weights.sum()
    bag_weight = params.train_mil.bag_weight
    synced = [p for g in opt.param_groups for p in g["params"]]
    for epoch in range(cfg.epochs):
        clam.train()
        student.train()
        freeze_batchnorm(student)
        opt.zero_grad(set_to_none=True)
        order = rng.choice(len(train), size=len(train), p=weights)
        groups = [order[i : i + cfg.accumulate] for i in range(0, len(order), cfg.accumulate)]
        mine_of = [range(*rank_bounds(len(g), world.size, world.rank)) for g in groups]
        # this rank's bags of the epoch, in order: the next bag's pixels are read (and decoded)
        # in a background thread while this one trains
        bags = prefetched(
            lambda s: slides[s].read_batch(topk[s]),
            [train[i] for g, mine in zip(groups, mine_of, strict=True) for j, i in enumerate(g)
             if j in mine],
        )  # fmt: skip
        used: list[str] = []
        for group, mine in tqdm(
            zip(groups, mine_of, strict=True),
            total=len(groups),
            desc=f"etc {epoch + 1}/{cfg.epochs}",
            disable=None,
            leave=False,
        ):
            for j, i in enumerate(group):
                s = train[i]
                if j not in mine:  # another rank's bag: keep the augmentation stream in step
                    if cfg.augment:
                        augment_draws(rng, len(topk[s]), cfg.colour_jitter)
                    continue
                used.append(s)
                pixels = next(bags)
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
                # over the step's bags on every rank: the ranks' sum is one process's gradient
                scaler.scale(loss / cfg.accumulate).backward()
            if world.size > 1:
                sum_gradients(synced, world)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        bags.close()
        ranks = world.gather(used)
        if history is not None:
            history.append({"epoch": epoch + 1, "ranks": ranks})
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
    `cache`. Under torchrun every rank calls it; rank 0 returns the summary, the others {}.

    Raises:
        ConfigError: mil.etc.accumulate does not divide by the number of processes, or a fold
            has fewer training slides than processes.
    """
    patches_dir, out = Path(patches_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = World.current()
    check_world(params.mil.etc.accumulate, world.size, "mil.etc.accumulate")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    classes = tuple(params.dataset.classes)
    labels = manifest.labels(classes)
    by_id = {s.slide_id: s for s in manifest.slides}
    needed = sorted({s for f in splits["folds"] for part in f.values() for s in part})
    teacher_bags = FeatureBags(teacher_features_dir, needed)
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
    rows, attention, folds, dim = [], {}, [], 0
    for k, fold in enumerate(splits["folds"]):
        seed = params.seed + 100 * k
        fold_dir = out / f"fold_{k}"
        topk = _fold_top_k(teacher_bags, labels, fold["train"], fold_dir, params, seed, world)
        student, spec = load_student(student_ckpt)
        epochs: list[dict[str, Any]] = []
        student = train_etc_fold(
            copy.deepcopy(student),
            spec,
            slides,
            topk,
            labels,
            fold["train"],
            params,
            seed,
            dev,
            world=world,
            history=epochs,
        )
        if world.main:
            save_student(out / f"student_fold_{k}.pt", student.cpu(), spec)
        ids = fold["train"] + fold["val"] + fold["test"]
        extracted = _reextract(
            student.to(dev), spec, slides, ids, fold_dir, k, dev, world, params.extract
        )
        record = {
            "world": world.size,
            "epochs": [
                {"epoch": e["epoch"], "bags_per_rank": [len(r) for r in e["ranks"]]} for e in epochs
            ],
            "reextracted_slides_per_rank": [len(r) for r in extracted],
            "reextracted_patches_per_rank": [sum(len(slides[s]) for s in r) for r in extracted],
        }
        if not world.main:
            continue
        # rank 0 alone: the fold's CLAM on the re-extracted features, one bag in memory at a time
        save_json(fold_dir / "ranks.json", {"epochs": epochs, "reextracted": extracted})
        bags = FeatureBags(fold_dir, ids)
        dim = bags.dim
        model, info = train_fold(
            bags, labels, fold["train"], fold["val"], len(classes), params.train_mil, seed
        )
        save_clam(out / f"fold_{k}.pt", model, {"fold": k, "classes": list(classes)})
        fold_rows, fold_attention = predict_slides(model, bags, fold["test"], labels, k, classes)
        rows += fold_rows
        attention.update(fold_attention)
        folds.append({"fold": k, **info, "ranks": record})
        shutil.rmtree(fold_dir / "features")  # the fold's student features: 4 x D bytes a patch
    if not world.main:
        return {}
    write_predictions(out, rows, attention)
    summary = {"classes": list(classes), "feature_dim": dim, "folds": folds}
    save_json(out / "summary.json", summary)
    return summary


def _fold_top_k(
    teacher_bags: FeatureBags,
    labels: dict[str, int],
    train: list[str],
    fold_dir: Path,
    params: Params,
    seed: int,
    world: World,
) -> dict[str, np.ndarray]:
    """The IB top-K indices of each training slide of a fold: rank 0 trains the IB head on the
    teacher bags and writes fold_<k>/topk/<slide_id>.h5; every rank gets rank 0's selection."""
    from efcm.training.ib import read_top_k, train_ib, write_top_k

    topk = {}
    if world.main:
        n_classes = len(params.dataset.classes)
        ib = train_ib(teacher_bags, labels, train, n_classes, params.ib, seed)
        for s in train:
            bag, coords = teacher_bags[s], teacher_bags.coords(s)
            topk[s] = read_top_k(write_top_k(ib, s, bag, coords, fold_dir, params.ib.k))[0]
    return world.broadcast(topk)


def _reextract(
    student: nn.Module,
    spec: Any,
    slides: dict[str, SlidePatches | StorePatches],
    ids: list[str],
    fold_dir: Path,
    fold: int,
    device: torch.device,
    world: World,
    params: ExtractParams,
) -> list[list[str]]:
    """Every patch of the fold's slides `ids` through the fine-tuned student, into
    fold_<k>/features/<slide_id>.h5 (float32, `write_features`): the slides are shared across the
    ranks balanced by patch count, each rank writing its own. Returns the slides each rank wrote,
    once every rank is done (a collective)."""
    encoder = nn.Sequential(PatchTransform(spec), student).to(device).eval()
    share = assign_shards([len(slides[s]) for s in ids], world.size)[world.rank]
    done = []
    for s in (ids[i] for i in sorted(share)):
        sp = slides[s]
        # as the student's extraction reads: extract.batch_size, extract.num_workers loaders
        feats = extract_slide(encoder, sp, params)
        attrs = {"slide_id": s, "encoder": f"etc student of fold {fold}", "rank": world.rank}
        write_features(fold_dir / "features" / f"{s}.h5", feats, sp.coords.coords, attrs)
        done.append(s)
    return world.gather(done)


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
