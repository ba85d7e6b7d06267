"""Feature distillation of the teacher into the student: VFD, FPD (+ TransScan) or MCM-KD.

`distill.method` picks one (see efcm.models.students and efcm.models.mcm):
- vfd: the whole student (backbone + linear projection) regresses the teacher's feature of each
  patch;
- fpd: only the TransScan projection on the frozen shallow student CNN is trained;
- mcm: s x s windows of neighbouring patches, a share masked; the student + context transformer
  predict the teacher's features of the masked positions (L1 on those only).

Targets are the teacher features already extracted (cached h5): the teacher never runs here. They
are standardised per dimension (mean and std of the training slides). AdamW with a linear warm-up
then cosine schedule, mixed precision on CUDA, a checkpoint after every epoch (a rerun resumes from
it when the configuration, the slides and their teacher features are the same). Validation on
held-out slides, before training (the undistilled student) and after every epoch: mean cosine
similarity and MSE of the student's output against the teacher's features (for MCM: of the
masked-position predictions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from efcm.config import DistillParams, Params
from efcm.features import device_of, features_identity, read_features
from efcm.io.cache import SlideCache
from efcm.io.files import atomic_path
from efcm.io.manifest import Manifest
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
from efcm.slides.patches import SlidePatches
from efcm.slides.patching import read_coords

log = logging.getLogger(__name__)

__all__ = ["distill", "load_student", "save_student"]


# -- data -----------------------------------------------------------------------------------------


class PairDataset(Dataset):
    """(patch uint8 (S, S, 3), teacher feature (D,)) over many slides (VFD, FPD)."""

    def __init__(self, slides: list[SlidePatches], targets: list[np.ndarray]) -> None:
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
        self, slides: list[SlidePatches], targets: list[np.ndarray], window: int, min_valid: float
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
) -> tuple[list[SlidePatches], list[np.ndarray]]:
    by_id = {s.slide_id: s for s in manifest.slides}
    slides, targets = [], []
    for sid in slide_ids:
        feats, coords = read_features(teacher_dir / "features" / f"{sid}.h5")
        cf = read_coords(patches_dir / "patches" / f"{sid}.h5")
        if len(cf.coords) != len(feats) or not np.array_equal(cf.coords, coords):
            raise ValueError(
                f"{sid}: teacher features do not match its coords file (re-run extract)"
            )
        slides.append(SlidePatches(by_id[sid].uri, cf, manifest.base_dir, cache))
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

    def __init__(self, params: Params, teacher_dim: int, cache: SlideCache | None = None) -> None:
        super().__init__()
        cfg: DistillParams = params.distill
        self.method, self.cfg = cfg.method, cfg
        self.transform = PatchTransform(params.student)
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

    @torch.no_grad()
    def evaluate(self, loader: DataLoader, seed: int) -> dict[str, float]:
        """Cosine (raw and centred on the teacher mean) and MSE in the teacher's space."""
        self.eval()
        dev = device_of(self)
        g = torch.Generator().manual_seed(seed)  # the same masks every time
        cos = ccos = mse = 0.0
        n = 0
        for batch in loader:
            batch = [t.to(dev) for t in batch]
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
        n = max(n, 1)
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
    params: Params, teacher_dim: int, train_ids: list[str], teacher: dict[str, dict[str, Any]]
) -> str:
    """What a checkpoint must match to be resumed: the configuration, the training slides and
    the teacher features of every slide used (new teacher features never resume an old run)."""
    blob = json.dumps(
        {
            "distill": params.distill.model_dump(mode="json"),
            "student": params.student.model_dump(mode="json"),
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
class _Data:
    """What a distillation trains and validates on."""

    train_ids: list[str]
    val_ids: list[str]
    train: Dataset
    val_loader: DataLoader | None
    train_targets: list[np.ndarray]  # (N_slide, D) teacher features of each training slide

    @property
    def teacher_dim(self) -> int:
        return self.train_targets[0].shape[1]


def _datasets(
    manifest: Manifest,
    patches_dir: Path,
    teacher_dir: Path,
    params: Params,
    cache: SlideCache | None = None,
) -> _Data:
    """The slides with teacher features, split into training and validation slides (by seed),
    as the method's datasets (patch pairs, or windows for MCM)."""
    cfg = params.distill
    available = [
        s.slide_id
        for s in manifest.slides
        if (teacher_dir / "features" / f"{s.slide_id}.h5").is_file()
    ]
    if not available:
        raise ValueError(f"no teacher features in {teacher_dir / 'features'}: run extract first")
    train_ids, val_ids = split_slides(available, cfg.val_fraction, params.seed)
    train_slides, train_targets = _slides(manifest, train_ids, patches_dir, teacher_dir, cache)

    def dataset(slides: list[SlidePatches], targets: list[np.ndarray]) -> Dataset:
        if cfg.method == "mcm":
            return WindowDataset(slides, targets, cfg.mcm.window, cfg.mcm.min_valid)
        return PairDataset(slides, targets)

    train = dataset(train_slides, train_targets)
    if len(train) == 0:
        raise ValueError(
            f"distill ({cfg.method}): no training items in {len(train_ids)} slides"
            + (" (no window has enough tissue patches)" if cfg.method == "mcm" else "")
        )
    val_loader = None
    if val_ids:
        val = dataset(*_slides(manifest, val_ids, patches_dir, teacher_dir, cache))
        if len(val):
            val_loader = DataLoader(val, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    return _Data(train_ids, val_ids, train, val_loader, train_targets)


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
        cls, model: Trainee, cfg: DistillParams, n_train: int, dev: torch.device
    ) -> _Optimiser:
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


@dataclass
class _Progress:
    """Where a distillation is: epochs done, their records, the undistilled student's metrics."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    before: dict[str, float] | None = None


def _resume(
    ckpt_path: Path, fingerprint: str, model: Trainee, optim: _Optimiser, dev: torch.device
) -> _Progress:
    """Load the checkpoint of the same run (same fingerprint) into the model and optimiser;
    a checkpoint of another run is ignored."""
    if not ckpt_path.is_file():
        return _Progress()
    ckpt = torch.load(ckpt_path, map_location=dev, weights_only=False)
    if ckpt.get("fingerprint") != fingerprint:
        log.info(
            "distill: %s is from another configuration, slide set or teacher features: "
            "starting over",
            ckpt_path,
        )
        return _Progress()
    model.load_state_dict(ckpt["model"])
    optim.opt.load_state_dict(ckpt["opt"])
    optim.sched.load_state_dict(ckpt["sched"])
    log.info("distill: resuming after epoch %d from %s", ckpt["epoch"], ckpt_path)
    return _Progress(ckpt["epoch"], ckpt["history"], ckpt["before"])


def _save_checkpoint(
    ckpt_path: Path, fingerprint: str, model: Trainee, optim: _Optimiser, progress: _Progress
) -> None:
    tmp = atomic_path(ckpt_path)
    torch.save(
        {
            "fingerprint": fingerprint,
            "epoch": progress.epoch,
            "model": model.state_dict(),
            "opt": optim.opt.state_dict(),
            "sched": optim.sched.state_dict(),
            "history": progress.history,
            "before": progress.before,
        },
        tmp,
    )
    os.replace(tmp, ckpt_path)


def _train_epoch(
    model: Trainee,
    train: Dataset,
    optim: _Optimiser,
    cfg: DistillParams,
    seed: int,
    epoch: int,
    dev: torch.device,
) -> float:
    """One pass over the training items, shuffled by (seed, epoch); returns the mean loss."""
    model.train()
    g = torch.Generator().manual_seed(seed * 1000 + epoch)  # the same order after a resume
    loader = DataLoader(
        train,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=g,
        num_workers=cfg.num_workers,
        drop_last=len(train) > cfg.batch_size,
        pin_memory=dev.type == "cuda",
    )
    total, n = 0.0, 0
    for batch in tqdm(
        loader, desc=f"distill {cfg.method} {epoch + 1}/{cfg.epochs}", disable=None, leave=False
    ):
        batch = [t.to(dev, non_blocking=True) for t in batch]
        with torch.autocast(dev.type, dtype=optim.amp_dtype, enabled=optim.amp):
            loss = model.loss(batch, g)
        optim.step(loss)
        total += loss.item() * len(batch[0])
        n += len(batch[0])
    return total / max(n, 1)


def _validate(model: Trainee, val_loader: DataLoader | None, seed: int) -> dict[str, float]:
    """The validation metrics of an epoch record (`val_cosine`, ...); none without validation
    slides."""
    if val_loader is None:
        return {}
    return {f"val_{k}": v for k, v in model.evaluate(val_loader, seed).items() if k != "n"}


def _write_outputs(
    out: Path, model: Trainee, params: Params, data: _Data, progress: _Progress
) -> dict[str, Any]:
    """student.pt (the student as deployed) and metrics.json; returns the metrics."""
    cfg = params.distill
    student = model.exported().cpu()
    save_student(out / "student.pt", student, params.student, fpd=cfg.fpd)
    history = progress.history
    metrics = {
        "method": cfg.method,
        "teacher_dim": data.teacher_dim,
        "student_dim": int(student.out_dim),
        "student_in_teacher_space": bool(student.teacher_space),
        "trainable_params": sum(p.numel() for p in model.trainable()),
        "train_slides": data.train_ids,
        "val_slides": data.val_ids,
        "history": history,
        "val_before": progress.before,
        "val_after": history[-1] if history else None,
    }
    tmp = atomic_path(out / "metrics.json")
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
    return metrics


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
    student), metrics.json, and checkpoint.pt after every epoch (resumed by a rerun). gs:// slides
    and student weights are staged into `cache`."""
    cfg = params.distill
    patches_dir, teacher_dir, out = Path(patches_dir), Path(teacher_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(params.seed)  # before the model's random init
    data = _datasets(manifest, patches_dir, teacher_dir, params, cache)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = Trainee(params, data.teacher_dim, cache)
    all_targets = torch.from_numpy(np.concatenate(data.train_targets))
    model.set_target_stats(all_targets.mean(0), all_targets.std(0))
    model.to(dev)
    optim = _Optimiser.build(model, cfg, len(data.train), dev)

    ckpt_path = out / "checkpoint.pt"
    teacher = teacher_identity(teacher_dir, data.train_ids + data.val_ids)
    fingerprint = _fingerprint(params, data.teacher_dim, data.train_ids, teacher)
    progress = _resume(ckpt_path, fingerprint, model, optim, dev)
    if progress.epoch == 0 and data.val_loader is not None:
        progress.before = model.evaluate(data.val_loader, params.seed)
        log.info("undistilled student (%s): val %s", cfg.method, progress.before)

    for epoch in range(progress.epoch, cfg.epochs):
        loss = _train_epoch(model, data.train, optim, cfg, params.seed, epoch, dev)
        rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss}
        rec.update(_validate(model, data.val_loader, params.seed))
        progress.history.append(rec)
        progress.epoch = epoch + 1
        log.info("distill %s epoch %d: %s", cfg.method, epoch + 1, rec)
        _save_checkpoint(ckpt_path, fingerprint, model, optim, progress)

    return _write_outputs(out, model, params, data, progress)
