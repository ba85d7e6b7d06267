"""Feature distillation of the teacher into the student: VFD, FPD (+ TransScan) or MCM-KD.

`distill.method` picks one (see efcm.models.students and efcm.models.mcm):
- vfd: the whole student (backbone + linear projection) regresses the teacher's feature of each
  patch;
- fpd: only the TransScan projection on the frozen shallow student CNN is trained;
- mcm: s x s windows of neighbouring patches, a share masked; the student + context transformer
  predict the teacher's features of the masked positions (L1 on those only).

Targets are the teacher features already extracted (cached h5): the teacher never runs here. They
are standardised per dimension (mean and std of the training slides). AdamW with a linear warm-up
then cosine schedule, mixed precision on CUDA. Validation on held-out slides, before training (the
undistilled student) and after every epoch: mean cosine similarity and MSE of the student's output
against the teacher's features (for MCM: of the masked-position predictions).

Several processes (torchrun; efcm.training.distributed): the model is wrapped in
DistributedDataParallel and every optimiser step's global batch of `distill.batch_size` items is
shared equally by the ranks (`plan_epoch`), so a step sees the same items, and MCM's masks are
drawn from the same random stream, whatever the world size; only BatchNorm's batch statistics are
per rank (each normalises its own share; rank 0's running statistics are broadcast at every
step). Validation is sharded: each rank evaluates every world-th validation batch and the sums are
all-reduced, so the figures are a single process's (up to summation order) and no rank idles
through a long validation. Rank 0 alone writes checkpoints, metrics.json and student.pt, and reads
the checkpoint it resumes from (sending it to the others); the others wait at a barrier at the end
of every epoch and of the run. Every rank reads its share of the slides and teacher features; only
rank 0 needs the output folder (several nodes need no shared disk for it).

Checkpoints (checkpoint.pt) after every epoch and every `distill.checkpoint_steps` optimiser steps:
model, optimiser, scheduler, GradScaler, the epoch and the step within it, the epoch's loss and
item counts so far, and the random state the next steps use (the global torch generator and the
epoch's mask stream, both the same on every rank), so a run killed mid-epoch and rerun continues at
the next step and ends with the weights of an uninterrupted run (on the CPU, same world size). A
rerun resumes when the configuration, the slides and their teacher features are the same (the
fingerprint holds nothing rank-specific, nor checkpoint_steps). A checkpoint written by another
number of processes is resumed too (the log says so): the global batches, hence the items of every
step, do not depend on the world size, only BatchNorm's per-rank statistics do.

metrics.json records the world size, the global batch, the items and steps of an epoch, every
resume (`resumed`: epoch, step, the writer's world size), and per epoch the items trained on over
all ranks (`items_seen`, all-reduced) and by each rank (`items_per_rank`; after a resume with
another world size, that epoch's per-rank counts cover the resumed part only).

The training loop runs over a `TrainSource` (efcm.training.distributed): the map-style datasets
below are served by `MapSource`; another source (a streamed store) plugs into `DistillData.train`.
`train_student` is the loop whatever the items: `distill` gives it slides' patches, and
efcm.training.image_distill whole images (VFD, FPD; validation by patient).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms import Join
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from efcm.config import DistillParams, EncoderParams, Params
from efcm.features import device_of, features_identity, read_features
from efcm.io.cache import SlideCache
from efcm.io.files import atomic_path
from efcm.io.manifest import Manifest
from efcm.io.store import require_store
from efcm.models.encoders import PatchTransform, build_backbone
from efcm.models.mcm import MaskedContextModel, grid_windows, masked_l1, random_mask
from efcm.models.students import (
    BackboneStudent,
    DistilledStudent,
    build_fpd,
    build_vfd,
    load_student,
    save_student,
)
from efcm.slides.patches import SlidePatches, StorePatches, open_patches
from efcm.slides.patching import read_coords
from efcm.training.distributed import MapSource, RankBatch, TrainSource, World, check_world
from efcm.training.store_data import StoreSource, StoreStream, target_stats

log = logging.getLogger(__name__)

# 2: the step within the epoch, the optimiser's GradScaler, the random state (mid-epoch resume);
# a checkpoint of format 1 (epoch ends only) is not resumed
CHECKPOINT_FORMAT = 2

__all__ = [
    "DistillData",
    "MapSource",
    "PairDataset",
    "TrainSource",
    "distill",
    "load_student",
    "save_student",
    "train_student",
]


# -- data -----------------------------------------------------------------------------------------


class Pixels(Protocol):
    """Where items' pixels come from: a slide's patches (SlidePatches, StorePatches) or a set
    of whole images (efcm.training.image_distill.ImagePixels)."""

    def read(self, i: int) -> np.ndarray:
        """uint8 (S, S, 3) of item `i`."""
        ...


class PairDataset(Dataset):
    """(patch or image uint8 (S, S, 3), teacher feature (D,)) over many sources (VFD, FPD):
    slides, or one set of images."""

    def __init__(self, slides: list[Pixels], targets: list[np.ndarray]) -> None:
        self.slides = slides
        self.targets = targets
        self.index = [(s, i) for s, t in enumerate(targets) for i in range(len(t))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, i = self.index[k]
        return torch.from_numpy(self.slides[s].read(i)), torch.from_numpy(self.targets[s][i])


class WindowDataset(Dataset):
    """s x s windows (MCM): patches uint8 (n, S, S, 3), targets (n, D), valid (n,) bool."""

    def __init__(
        self,
        slides: list[SlidePatches | StorePatches],
        targets: list[np.ndarray],
        window: int,
        min_valid: float,
    ) -> None:
        self.slides, self.targets = slides, targets
        self.items: list[tuple[int, np.ndarray]] = []
        for s, sp in enumerate(slides):
            step0 = sp.coords.step0
            if step0 is None:
                raise ValueError(
                    f"{sp.coords.name}: its coords are not a regular grid (MCM needs "
                    "neighbouring patches)"
                )
            for w in grid_windows(sp.coords.coords, step0, window, min_valid):
                self.items.append((s, w))
        size = slides[0].coords.patch_size if slides else 0
        self.blank = np.zeros((size, size, 3), np.uint8)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, idx = self.items[k]
        valid = idx >= 0
        patches = np.stack([self.slides[s].read(int(i)) if i >= 0 else self.blank for i in idx])
        dim = self.targets[s].shape[1]
        targets = np.zeros((len(idx), dim), np.float32)
        targets[valid] = self.targets[s][idx[valid]]
        return torch.from_numpy(patches), torch.from_numpy(targets), torch.from_numpy(valid)


def _slides(
    manifest: Manifest,
    slide_ids: list[str],
    patches_dir: Path,
    teacher_dir: Path,
    cache: SlideCache | None,
    store_dir: Path | None = None,
) -> tuple[list[SlidePatches | StorePatches], list[np.ndarray]]:
    """Each slide's patches (from the store `store_dir` when given, else from the slide) and its
    teacher features."""
    by_id = {s.slide_id: s for s in manifest.slides}
    slides, targets = [], []
    for sid in slide_ids:
        feats, coords = read_features(teacher_dir / "features" / f"{sid}.h5")
        cf = read_coords(patches_dir / "patches" / f"{sid}.h5")
        if len(cf.coords) != len(feats) or not np.array_equal(cf.coords, coords):
            raise ValueError(
                f"{sid}: teacher features do not match its coords file (re-run extract)"
            )
        slides.append(open_patches(sid, by_id[sid].uri, cf, manifest.base_dir, cache, store_dir))
        targets.append(feats)
    return slides, targets


def split_slides(
    slide_ids: list[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    ids = sorted(slide_ids)
    np.random.default_rng(seed).shuffle(ids)
    n_val = 0
    if val_fraction > 0 and len(ids) > 1:
        n_val = max(1, round(len(ids) * val_fraction))
    return ids[n_val:], ids[:n_val]


# -- the model being trained ----------------------------------------------------------------------


def distill_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    cos = 1 - F.cosine_similarity(pred, target, dim=-1).mean()
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "cosine":
        return cos
    return F.mse_loss(pred, target) + cos  # mse_cosine


class Trainee(nn.Module):
    """What one distillation step trains, with the method's loss. Targets are standardised."""

    def __init__(
        self,
        params: Params,
        teacher_dim: int,
        cache: SlideCache | None = None,
        spec: EncoderParams | None = None,
    ) -> None:
        """`spec`: the student's input transform (default `params.student`; whole images: the
        image task's `encoder_spec`)."""
        super().__init__()
        cfg: DistillParams = params.distill
        self.method, self.cfg = cfg.method, cfg
        self.transform = PatchTransform(spec or params.student)
        self.register_buffer("mean", torch.zeros(teacher_dim))
        self.register_buffer("std", torch.ones(teacher_dim))
        if cfg.method == "vfd":
            self.student: nn.Module = build_vfd(params.student, teacher_dim, cache=cache)
        elif cfg.method == "fpd":
            self.student = build_fpd(params.student, teacher_dim, cfg.fpd, cache=cache)
        else:
            backbone, _ = build_backbone(params.student, cache=cache)
            self.student = MaskedContextModel(
                backbone,
                teacher_dim,
                window=cfg.mcm.window,
                embed_dim=cfg.mcm.embed_dim,
                depth=cfg.mcm.depth,
                heads=cfg.mcm.heads,
            )

    def set_target_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std.clamp_min(1e-6))
        if isinstance(self.student, DistilledStudent):
            self.student.set_target_stats(self.mean, self.std)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    @property
    def mask_positions(self) -> int:
        """Positions of a window whose MCM mask draws one random number each (0: no masks)."""
        return self.cfg.mcm.window**2 if self.method == "mcm" else 0

    def _windows(self, patches: torch.Tensor) -> torch.Tensor:
        b, n = patches.shape[:2]
        x = self.transform(patches.flatten(0, 1))
        return x.view(b, n, *x.shape[1:])  # (B, n, 3, H, W)

    def loss(
        self, batch: tuple[torch.Tensor, ...], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if self.method == "mcm":
            patches, targets, valid = batch
            mask = random_mask(valid, self.cfg.mcm.mask_ratio, generator)
            pred = self.student(self._windows(patches), valid, mask)
            return masked_l1(pred, (targets - self.mean) / self.std, mask)
        x, y = batch
        pred = self.student.standardised(self.transform(x))
        return distill_loss(pred, (y - self.mean) / self.std, self.cfg.loss)

    def forward(
        self, batch: list[torch.Tensor], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The training loss (what DistributedDataParallel calls)."""
        return self.loss(batch, generator)

    @torch.no_grad()
    def evaluate(
        self,
        val: Dataset,
        batch_size: int,
        seed: int,
        *,
        num_workers: int = 0,
        world: World | None = None,
    ) -> dict[str, float]:
        """Cosine (raw and centred on the teacher mean) and MSE in the teacher's space, over
        `val` in batches of `batch_size`; in a world of several ranks, each takes every
        world-th batch and the sums are all-reduced (every rank gets the figures)."""
        world = world or World()
        self.eval()
        dev = device_of(self)
        g = torch.Generator().manual_seed(seed)  # the same masks every time
        batches = [
            list(range(i, min(i + batch_size, len(val)))) for i in range(0, len(val), batch_size)
        ]
        mine = [b for k, b in enumerate(batches) if k % world.size == world.rank]
        # one loader per call on every rank: its base seed takes one draw of the global
        # generator, as before, and the same on every rank
        loader = iter(DataLoader(val, batch_sampler=mine, num_workers=num_workers))
        cos = ccos = mse = 0.0
        n = 0
        for k, idx in enumerate(batches):
            if k % world.size != world.rank:
                if self.mask_positions:  # another rank's batch: skip its masks' draws
                    torch.rand(len(idx), self.mask_positions, generator=g)
                continue
            batch = [t.to(dev) for t in next(loader)]
            if self.method == "mcm":
                patches, targets, valid = batch
                mask = random_mask(valid, self.cfg.mcm.mask_ratio, g)
                pred = self.student(self._windows(patches), valid, mask)[mask]
                pred, y = pred.float() * self.std + self.mean, targets[mask]
            else:
                x, y = batch
                pred = self.student(self.transform(x)).float()
            cos += F.cosine_similarity(pred, y, dim=-1).sum().item()
            ccos += F.cosine_similarity(pred - self.mean, y - self.mean, dim=-1).sum().item()
            mse += F.mse_loss(pred, y, reduction="none").mean(-1).sum().item()
            n += len(y)
        cos, ccos, mse, total = world.sum([cos, ccos, mse, n])
        n = max(round(total), 1)
        return {"cosine": cos / n, "centered_cosine": ccos / n, "mse": mse / n, "n": n}

    def exported(self) -> nn.Module:
        """The student as deployed: for MCM the backbone alone (transformer, predictor dropped)."""
        if isinstance(self.student, MaskedContextModel):
            return BackboneStudent(self.student.backbone)
        return self.student


def warmup_cosine(
    opt: torch.optim.Optimizer, total_steps: int, warmup_fraction: float
) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def teacher_identity(teacher_dir: Path, slide_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Per slide, what identifies its teacher features file (see `features_identity`: the stored
    encoder, weights and coords hashes, shape and dtype), without reading the features."""
    return {
        sid: features_identity(teacher_dir / "features" / f"{sid}.h5") for sid in sorted(slide_ids)
    }


def _fingerprint(
    params: Params,
    teacher_dim: int,
    train_ids: list[str],
    teacher: dict[str, Any],
    store: dict[str, Any] | None = None,
) -> str:
    """What a checkpoint must match to be resumed: the checkpoint's format, the configuration,
    the training slides (or cases) and the teacher features of every item used (new teacher
    features never resume an old run); `store`: the patch-shard store's settings when the pixels
    come from it."""
    blob = json.dumps(
        {
            "format": CHECKPOINT_FORMAT,
            # how often checkpoints are written changes no result: a rerun may change it
            "distill": params.distill.model_dump(mode="json", exclude={"checkpoint_steps"}),
            "student": params.student.model_dump(mode="json"),
            # the store's pixels and its stream's order (None: the slides, map-style)
            "store": store,
            "seed": params.seed,
            "teacher_dim": teacher_dim,
            "train": train_ids,
            "teacher": teacher,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


# -- the stage ------------------------------------------------------------------------------------


@dataclass
class DistillData:
    """What a distillation trains and validates on: slides' patches (`_datasets`), or whole
    images (efcm.training.image_distill)."""

    train_ids: list[str]  # the training slides (images: cases), in metrics.json
    val_ids: list[str]
    train: TrainSource
    val: Dataset | None
    target_mean: torch.Tensor  # (D,) of the training items' teacher features
    target_std: torch.Tensor  # (D,)
    unit: str = "slides"  # what train_ids name: metrics.json's train_<unit>, val_<unit>
    pixels: str = "slides"  # where the pixels came from (metrics.json): slides, store, images
    spec: EncoderParams | None = None  # the student's input transform; None: params.student

    @property
    def teacher_dim(self) -> int:
        return int(self.target_mean.shape[0])


def _datasets(
    manifest: Manifest,
    patches_dir: Path,
    teacher_dir: Path,
    params: Params,
    cache: SlideCache | None = None,
    *,
    pin_memory: bool = False,
) -> DistillData:
    """The slides with teacher features, split into training and validation slides (by seed),
    as the method's datasets (patch pairs, or windows for MCM); the training set as a source of
    per-rank batches."""
    cfg = params.distill
    available = [
        s.slide_id
        for s in manifest.slides
        if (teacher_dir / "features" / f"{s.slide_id}.h5").is_file()
    ]
    if not available:
        raise ValueError(f"no teacher features in {teacher_dir / 'features'}: run extract first")
    train_ids, val_ids = split_slides(available, cfg.val_fraction, params.seed)
    if params.store.enabled:
        return _store_data(
            manifest, patches_dir, teacher_dir, params, train_ids, val_ids, pin_memory
        )
    train_slides, train_targets = _slides(manifest, train_ids, patches_dir, teacher_dir, cache)
    train = _dataset(cfg, train_slides, train_targets)
    if len(train) == 0:
        raise ValueError(_no_items(cfg, train_ids))
    val = None
    if val_ids:
        val = _dataset(cfg, *_slides(manifest, val_ids, patches_dir, teacher_dir, cache))
        val = val if len(val) else None
    source = MapSource(
        train, cfg.batch_size, params.seed, num_workers=cfg.num_workers, pin_memory=pin_memory
    )
    all_targets = torch.from_numpy(np.concatenate(train_targets))
    return DistillData(train_ids, val_ids, source, val, all_targets.mean(0), all_targets.std(0))


def _dataset(
    cfg: DistillParams, slides: list[SlidePatches | StorePatches], targets: list[np.ndarray]
) -> Dataset:
    """The method's map-style dataset: patch pairs, or windows for MCM."""
    if cfg.method == "mcm":
        return WindowDataset(slides, targets, cfg.mcm.window, cfg.mcm.min_valid)
    return PairDataset(slides, targets)


def _no_items(cfg: DistillParams, train_ids: list[str]) -> str:
    return f"distill ({cfg.method}): no training items in {len(train_ids)} slides" + (
        " (no window has enough tissue patches)" if cfg.method == "mcm" else ""
    )


def _store_data(
    manifest: Manifest,
    patches_dir: Path,
    teacher_dir: Path,
    params: Params,
    train_ids: list[str],
    val_ids: list[str],
    pin_memory: bool,
) -> DistillData:
    """With `store.enabled`: the training items streamed from the patch-shard store of the
    teacher's extraction (`efcm.training.store_data`), the validation slides read from it by
    index; no slide is opened. The target statistics are summed slide by slide."""
    cfg = params.distill
    store_dir = require_store(teacher_dir)
    steps0 = None  # MCM's windows need each slide's grid step (its coords file)
    if cfg.method == "mcm":
        steps0 = {s: read_coords(patches_dir / "patches" / f"{s}.h5").step0 for s in train_ids}
    stream = StoreStream(
        store_dir, teacher_dir, train_ids, cfg, params.store, params.seed, steps0=steps0
    )
    if len(stream) == 0:
        raise ValueError(_no_items(cfg, train_ids))
    val = None
    if val_ids:
        val_slides = _slides(manifest, val_ids, patches_dir, teacher_dir, None, store_dir)
        val = _dataset(cfg, *val_slides)
        val = val if len(val) else None
    source = StoreSource(
        stream, cfg.batch_size, params.seed, num_workers=cfg.num_workers, pin_memory=pin_memory
    )
    stats = target_stats(teacher_dir, train_ids)
    return DistillData(train_ids, val_ids, source, val, *stats, pixels="store")


@dataclass
class _Optimiser:
    """AdamW over the trainable parameters, the warm-up + cosine schedule, and mixed precision."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp: bool
    amp_dtype: torch.dtype

    @classmethod
    def build(
        cls,
        model: Trainee,
        cfg: DistillParams,
        n_train: int,
        dev: torch.device,
        *,
        steps_per_epoch: int | None = None,
    ) -> _Optimiser:
        """`steps_per_epoch` defaults to a single process's over `n_train` items."""
        if steps_per_epoch is None:
            steps_per_epoch = max(1, n_train // cfg.batch_size)
        opt = torch.optim.AdamW(model.trainable(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = warmup_cosine(opt, cfg.epochs * steps_per_epoch, cfg.warmup_fraction)
        amp = dev.type == "cuda" and cfg.amp
        amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
        return cls(opt, sched, scaler, amp, amp_dtype)

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()

    def state_dict(self) -> dict[str, Any]:
        return {
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.scaler.load_state_dict(state["scaler"])


@dataclass
class _Tally:
    """An epoch's training loss and items so far. `loss_sum` and `items` count what this rank
    trained on (rank 0 also carries the share a resumed run had done before), `own` this rank's
    items; the epoch's figures are their sums over the ranks (`reduced`)."""

    loss_sum: float = 0.0
    items: int = 0
    own: int = 0

    def add(self, loss: float, n: int) -> None:
        self.loss_sum += loss * n
        self.items += n
        self.own += n

    def reduced(self, world: World) -> dict[str, Any]:
        """The epoch so far over all ranks (a collective when the world has several):
        loss_sum, items, per_rank."""
        if world.size == 1:
            return {"loss_sum": self.loss_sum, "items": self.items, "per_rank": [self.own]}
        values = [0.0] * (2 + world.size)
        values[0], values[1], values[2 + world.rank] = self.loss_sum, self.items, self.own
        total = world.sum(values)
        return {
            "loss_sum": total[0],
            "items": round(total[1]),
            "per_rank": [round(v) for v in total[2:]],
        }


@dataclass
class _Progress:
    """Where a distillation is: epochs done, steps done in the next one and what they trained
    on, the random state that continues them, the epochs' records, the undistilled student's
    metrics."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, float] | None = None
    partial: dict[str, Any] | None = None  # `_Tally.reduced` of the unfinished epoch
    mask_rng: torch.Tensor | None = None  # the unfinished epoch's mask stream
    world: int = 1  # processes of the run that wrote the checkpoint
    resumed: list[dict[str, int]] = field(default_factory=list)


def _rng_state(dev: torch.device) -> dict[str, torch.Tensor]:
    """The global generators the next steps use (dropout, the validation loader's seed draw);
    the same on every rank, as every rank draws from them alike."""
    state = {"cpu": torch.get_rng_state()}
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], dev: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if dev.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], dev)


def _resume(
    ckpt_path: Path,
    fingerprint: str,
    model: Trainee,
    optim: _Optimiser,
    dev: torch.device,
    world: World,
    steps_per_epoch: int,
) -> _Progress:
    """Load the checkpoint of the same run (same fingerprint) into the model and optimiser;
    a checkpoint of another run is ignored. Rank 0 reads it and sends it to the others, so they
    need not see the output folder."""
    ckpt = None
    if world.main and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt.get("fingerprint") != fingerprint:
            log.info(
                "distill: %s is from another configuration, slide set or teacher features: "
                "starting over",
                ckpt_path,
            )
            ckpt = None
        elif ckpt["step"] and ckpt["steps_per_epoch"] != steps_per_epoch:
            # cannot happen with the same items and global batch; refuse rather than guess
            log.info(
                "distill: %s stopped at step %d of %d steps per epoch, this run has %d per "
                "epoch: starting over",
                ckpt_path,
                ckpt["step"],
                ckpt["steps_per_epoch"],
                steps_per_epoch,
            )
            ckpt = None
    ckpt = world.broadcast(ckpt)
    if ckpt is None:
        return _Progress()
    model.load_state_dict(ckpt["model"])
    optim.load_state_dict(ckpt["optim"])
    _set_rng_state(ckpt["rng"], dev)
    epoch, step, old_world = ckpt["epoch"], ckpt["step"], ckpt["world"]
    if step:
        log.info(
            "distill: resuming in epoch %d at step %d of %d (%d steps done) from %s",
            epoch + 1,
            step + 1,
            steps_per_epoch,
            step,
            ckpt_path,
        )
    else:
        log.info("distill: resuming after epoch %d from %s", epoch, ckpt_path)
    if old_world != world.size:
        log.info(
            "distill: the checkpoint was written by %d process(es), this run has %d: the global "
            "batches, hence the items of every step, are the same; BatchNorm's per-process batch "
            "statistics are not, so the weights will differ slightly from an uninterrupted run",
            old_world,
            world.size,
        )
    resumed = [*ckpt["resumed"], {"epoch": epoch + 1, "step": step, "world": old_world}]
    return _Progress(
        epoch,
        step,
        ckpt["history"],
        ckpt["before"],
        ckpt["partial"],
        ckpt["mask_rng"],
        old_world,
        resumed,
    )


def _save_checkpoint(
    ckpt_path: Path,
    fingerprint: str,
    model: Trainee,
    optim: _Optimiser,
    progress: _Progress,
    dev: torch.device,
    steps_per_epoch: int,
) -> None:
    """checkpoint.pt, atomically (rank 0 calls it)."""
    tmp = atomic_path(ckpt_path)
    torch.save(
        {
            "fingerprint": fingerprint,
            "epoch": progress.epoch,
            "step": progress.step,
            "steps_per_epoch": steps_per_epoch,
            "world": progress.world,
            "model": model.state_dict(),
            "optim": optim.state_dict(),
            "rng": _rng_state(dev),
            "mask_rng": progress.mask_rng,
            "partial": progress.partial,
            "history": progress.history,
            "before": progress.before,
            "resumed": progress.resumed,
        },
        tmp,
    )
    os.replace(tmp, ckpt_path)


@dataclass
class _Loop:
    """What the training loop runs: the model (and its DDP wrapper, `net`), a source of
    per-rank batches, the optimiser, the world, the device."""

    model: Trainee
    net: nn.Module  # what the steps call: the model, or DistributedDataParallel around it
    source: TrainSource
    optim: _Optimiser
    cfg: DistillParams
    world: World
    dev: torch.device

    def epoch(
        self,
        epoch: int,
        start_step: int,
        tally: _Tally,
        g: torch.Generator,
        after_step: Callable[[int, _Tally, torch.Generator], None] | None = None,
    ) -> _Tally:
        """Train one epoch from `start_step` on this rank's batches; `g` is the epoch's mask
        stream (where `start_step` left it). `after_step(steps_done, tally, g)` runs after every
        optimiser step but the epoch's last."""
        self.model.train()
        steps = self.source.steps_per_epoch(self.world.size)
        positions = self.model.mask_positions
        batches = self.source.epoch_batches(epoch, self.world.rank, self.world.size, start_step)
        joined = (
            Join([self.net])
            if self.source.uneven and self.world.size > 1
            else contextlib.nullcontext()
        )
        with joined:
            for step, rb in enumerate(
                tqdm(
                    batches,
                    total=steps - start_step,
                    desc=f"distill {self.cfg.method} {epoch + 1}/{self.cfg.epochs}",
                    disable=None if self.world.main else True,
                    leave=False,
                ),
                start_step,
            ):
                self._step(rb, g, positions, tally)
                if after_step is not None and step + 1 < steps:
                    after_step(step + 1, tally, g)
        return tally

    def _step(self, rb: RankBatch, g: torch.Generator, positions: int, tally: _Tally) -> None:
        batch = [t.to(self.dev, non_blocking=True) for t in rb.tensors]
        with (
            _own_rows(g, rb, positions),
            torch.autocast(self.dev.type, dtype=self.optim.amp_dtype, enabled=self.optim.amp),
        ):
            loss = self.net(batch, g)
        self.optim.step(loss)
        tally.add(loss.item(), len(batch[0]))


@contextlib.contextmanager
def _own_rows(g: torch.Generator, rb: RankBatch, positions: int) -> Iterator[None]:
    """Inside the block, `g` is where a single process would draw the masks of this rank's rows
    of the global batch: the draws of the lower ranks' rows are skipped before, the higher
    ones' after (each window draws `positions` numbers; none when 0)."""
    if positions and rb.rows_before:
        torch.rand(rb.rows_before, positions, generator=g)
    yield
    if positions and rb.rows_after:
        torch.rand(rb.rows_after, positions, generator=g)


def _train_epoch(
    model: Trainee,
    train: Dataset,
    optim: _Optimiser,
    cfg: DistillParams,
    seed: int,
    epoch: int,
    dev: torch.device,
) -> float:
    """One single-process pass over a map-style dataset, shuffled by (seed, epoch); returns the
    mean loss (benchmarks/device_check.py times it)."""
    source = MapSource(
        train, cfg.batch_size, seed, num_workers=cfg.num_workers, pin_memory=dev.type == "cuda"
    )
    loop = _Loop(model, model, source, optim, cfg, World(), dev)
    tally = loop.epoch(epoch, 0, _Tally(), source.mask_generator(epoch))
    return tally.loss_sum / max(tally.items, 1)


def _validate(
    model: Trainee, val: Dataset | None, cfg: DistillParams, seed: int, world: World
) -> dict[str, float]:
    """The validation metrics of an epoch record (`val_cosine`, ...); none without validation
    slides."""
    if val is None:
        return {}
    metrics = model.evaluate(val, cfg.batch_size, seed, num_workers=cfg.num_workers, world=world)
    return {f"val_{k}": v for k, v in metrics.items() if k != "n"}


def _metrics(
    model: Trainee, params: Params, data: DistillData, progress: _Progress, world: World
) -> dict[str, Any]:
    """metrics.json's content."""
    cfg = params.distill
    student = model.exported()
    history = progress.history
    return {
        "method": cfg.method,
        "teacher_dim": data.teacher_dim,
        "student_dim": int(student.out_dim),
        "student_in_teacher_space": bool(student.teacher_space),
        "trainable_params": sum(p.numel() for p in model.trainable()),
        f"train_{data.unit}": data.train_ids,
        f"val_{data.unit}": data.val_ids,
        "world_size": world.size,
        "global_batch": cfg.batch_size,
        "items_per_epoch": len(data.train),
        "pixels": data.pixels,  # where the pixels came from: slides, store, images
        "steps_per_epoch": data.train.steps_per_epoch(world.size),
        "resumed": progress.resumed,
        "history": history,
        "val_before": progress.before,
        "val_after": history[-1] if history else None,
    }


def _write_outputs(
    out: Path, model: Trainee, params: Params, data: DistillData, metrics: dict[str, Any]
) -> None:
    """student.pt (the student as deployed, with the input transform it was trained with) and
    metrics.json (rank 0 calls it)."""
    student = model.exported().cpu()
    spec = data.spec or params.student
    save_student(out / "student.pt", student, spec, fpd=params.distill.fpd)
    tmp = atomic_path(out / "metrics.json")
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")


def _device(device: str | None) -> torch.device:
    """The device asked for, else CUDA when there is one (this process's GPU: torchrun's
    LOCAL_RANK, set by `process_group`), else the CPU."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def distill(
    manifest: Manifest,
    patches_dir: str | Path,
    teacher_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    device: str | None = None,
    cache: SlideCache | None = None,
) -> dict[str, Any]:
    """Train the student on cached teacher features; writes out_dir/student.pt (the exported
    student), metrics.json, and checkpoint.pt after every epoch and every
    `distill.checkpoint_steps` steps (resumed by a rerun). gs:// slides and student weights are
    staged into `cache`. Inside a process group (torchrun, `efcm.training.distributed`) every rank
    calls it: DDP over the group, rank 0 writes the files; every rank returns the metrics."""
    patches_dir, teacher_dir = Path(patches_dir), Path(teacher_dir)

    def data(dev: torch.device) -> DistillData:
        pin = dev.type == "cuda"
        return _datasets(manifest, patches_dir, teacher_dir, params, cache, pin_memory=pin)

    def fingerprint(data: DistillData) -> str:
        teacher = teacher_identity(teacher_dir, data.train_ids + data.val_ids)
        store = params.store.model_dump(mode="json") if params.store.enabled else None
        return _fingerprint(params, data.teacher_dim, data.train_ids, teacher, store)

    return train_student(data, fingerprint, out_dir, params, device=device, cache=cache)


def train_student(
    make_data: Callable[[torch.device], DistillData],
    fingerprint_of: Callable[[DistillData], str],
    out_dir: str | Path,
    params: Params,
    *,
    device: str | None = None,
    cache: SlideCache | None = None,
) -> dict[str, Any]:
    """The distillation itself, whatever the items (see `distill`): `make_data(device)` gives
    the items, `fingerprint_of(data)` what a checkpoint must match to be resumed (rank 0 alone
    calls it); gs:// student weights are staged into `cache`."""
    cfg = params.distill
    world = World.current()
    check_world(cfg.batch_size, world.size)
    out = Path(out_dir)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(params.seed)  # before the model's random init
    dev = _device(device)
    data = make_data(dev)
    steps = data.train.steps_per_epoch(world.size)

    model = Trainee(params, data.teacher_dim, cache, data.spec)
    model.set_target_stats(data.target_mean, data.target_std)
    model.to(dev)
    optim = _Optimiser.build(model, cfg, len(data.train), dev, steps_per_epoch=steps)

    ckpt_path = out / "checkpoint.pt"
    fingerprint = ""
    if world.main:  # only rank 0 reads and writes checkpoints
        fingerprint = fingerprint_of(data)
    progress = _resume(ckpt_path, fingerprint, model, optim, dev, world, steps)
    if progress.epoch == 0 and progress.step == 0 and data.val is not None:
        progress.before = model.evaluate(
            data.val, cfg.batch_size, params.seed, num_workers=cfg.num_workers, world=world
        )
        log.info("undistilled student (%s): val %s", cfg.method, progress.before)

    net: nn.Module = model
    if world.size > 1:
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    loop = _Loop(model, net, data.train, optim, cfg, world, dev)

    def save() -> None:
        if world.main:
            _save_checkpoint(ckpt_path, fingerprint, model, optim, progress, dev, steps)

    def after_step(done: int, tally: _Tally, g: torch.Generator) -> None:
        every = cfg.checkpoint_steps
        if every and (progress.epoch * steps + done) % every == 0:
            progress.step, progress.partial = done, tally.reduced(world)
            progress.mask_rng, progress.world = g.get_state(), world.size
            save()

    for epoch in range(progress.epoch, cfg.epochs):
        tally = _carried_tally(progress, world)
        g = data.train.mask_generator(epoch)
        if progress.mask_rng is not None:
            g.set_state(progress.mask_rng)
        tally = loop.epoch(epoch, progress.step, tally, g, after_step)
        done = tally.reduced(world)
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": done["loss_sum"] / max(done["items"], 1),
            "items_seen": done["items"],
            "items_per_rank": done["per_rank"],
            "world": world.size,
        }
        rec.update(_validate(model, data.val, cfg, params.seed, world))
        progress.history.append(rec)
        progress.epoch, progress.step, progress.world = epoch + 1, 0, world.size
        progress.partial = progress.mask_rng = None
        log.info("distill %s epoch %d: %s", cfg.method, epoch + 1, rec)
        save()
        world.barrier()

    metrics = _metrics(model, params, data, progress, world)
    if world.main:
        _write_outputs(out, model, params, data, metrics)
    world.barrier()
    return metrics


def _carried_tally(progress: _Progress, world: World) -> _Tally:
    """The tally an epoch starts from: empty, or what a resumed checkpoint's ranks had done (its
    loss and items on rank 0; each rank its own count when the world size is the same)."""
    p = progress.partial
    if p is None:
        return _Tally()
    own = p["per_rank"][world.rank] if progress.world == world.size else 0
    if world.main:
        return _Tally(p["loss_sum"], p["items"], own)
    return _Tally(0.0, 0, own)
