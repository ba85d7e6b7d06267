"""Feature distillation. VFD: the whole student (backbone + linear projection to the teacher dim) is
trained to regress the teacher's features.

Targets are the teacher features already extracted (cached h5), so the teacher never runs here.
Validation on held-out slides reports the mean cosine similarity and MSE between student output and
teacher features, before training (the undistilled student) and after every epoch.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from efcm.config import DistillParams, EncoderParams, Params
from efcm.features import device_of, read_features
from efcm.manifest import Manifest
from efcm.models.encoders import EncoderWithTransform, Student, build_student
from efcm.slides.patches import SlidePatches
from efcm.slides.patching import read_coords
from efcm.storage import atomic_path

log = logging.getLogger(__name__)


class PairDataset(Dataset):
    """(patch uint8 (S, S, 3), teacher feature (D,)) over many slides."""

    def __init__(self, slides: list[SlidePatches], targets: list[np.ndarray]) -> None:
        self.slides = slides
        self.targets = targets
        self.index = [(s, i) for s, t in enumerate(targets) for i in range(len(t))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, i = self.index[k]
        return torch.from_numpy(self.slides[s].read(i)), torch.from_numpy(self.targets[s][i])


def distill_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    cos = 1 - F.cosine_similarity(pred, target, dim=-1).mean()
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "cosine":
        return cos
    return F.mse_loss(pred, target) + cos  # mse_cosine


def _pairs(
    manifest: Manifest, slide_ids: list[str], patches_dir: Path, teacher_dir: Path
) -> PairDataset:
    by_id = {s.slide_id: s for s in manifest.slides}
    slides, targets = [], []
    for sid in slide_ids:
        feats, coords = read_features(teacher_dir / "features" / f"{sid}.h5")
        cf = read_coords(patches_dir / "patches" / f"{sid}.h5")
        if len(cf.coords) != len(feats) or not np.array_equal(cf.coords, coords):
            raise ValueError(
                f"{sid}: teacher features do not match its coords file (re-run extract)"
            )
        slides.append(SlidePatches(by_id[sid].uri, cf, manifest.base_dir))
        targets.append(feats)
    return PairDataset(slides, targets)


@torch.no_grad()
def validate(model: EncoderWithTransform, loader: DataLoader) -> dict[str, float]:
    """Mean cosine similarity and MSE of student output vs teacher features, in the teacher's space.

    `centered_cosine` subtracts the teacher's mean feature first: raw cosine is inflated by the mean
    direction that every patch shares, the centred one shows whether the variation is matched.
    """
    model.eval()
    device = device_of(model)
    mean = model.encoder.target_mean
    cos, ccos, mse, n = 0.0, 0.0, 0.0, 0
    for x, y in loader:
        p = model(x.to(device)).float()
        y = y.to(device)
        cos += F.cosine_similarity(p, y, dim=-1).sum().item()
        ccos += F.cosine_similarity(p - mean, y - mean, dim=-1).sum().item()
        mse += F.mse_loss(p, y, reduction="none").mean(-1).sum().item()
        n += len(x)
    n = max(n, 1)
    return {"cosine": cos / n, "centered_cosine": ccos / n, "mse": mse / n, "n_patches": n}


def split_slides(
    slide_ids: list[str], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    ids = sorted(slide_ids)
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    n_val = round(len(ids) * val_fraction) if len(ids) > 1 else 0
    if val_fraction > 0 and len(ids) > 1:
        n_val = max(1, n_val)
    return ids[n_val:], ids[:n_val]


def distill(
    manifest: Manifest,
    patches_dir: str | Path,
    teacher_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    device: str | None = None,
) -> dict[str, Any]:
    """Train the student (VFD) on cached teacher features; writes out_dir/student.pt and
    metrics.json."""
    cfg: DistillParams = params.distill
    patches_dir, teacher_dir, out = Path(patches_dir), Path(teacher_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(params.seed)
    available = [
        s.slide_id
        for s in manifest.slides
        if (teacher_dir / "features" / f"{s.slide_id}.h5").is_file()
    ]
    if not available:
        raise ValueError(f"no teacher features in {teacher_dir / 'features'}: run extract first")
    train_ids, val_ids = split_slides(available, cfg.val_fraction, params.seed)
    train = _pairs(manifest, train_ids, patches_dir, teacher_dir)
    teacher_dim = train.targets[0].shape[1]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    student = build_student(params.student, teacher_dim)
    all_targets = torch.from_numpy(np.concatenate(train.targets))
    student.set_target_stats(all_targets.mean(0), all_targets.std(0))
    model = EncoderWithTransform(student, params.student).to(dev)
    g = torch.Generator().manual_seed(params.seed)
    loader = DataLoader(
        train,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=g,
        num_workers=cfg.num_workers,
        drop_last=len(train) > cfg.batch_size,
    )
    val_loader = None
    if val_ids:
        val_loader = DataLoader(
            _pairs(manifest, val_ids, patches_dir, teacher_dir),
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
        )
    opt = torch.optim.AdamW(model.encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, cfg.epochs * len(loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1
    )
    history: list[dict[str, Any]] = []
    before = validate(model, val_loader) if val_loader else None
    if before:
        log.info("undistilled student: val cosine %.4f mse %.4f", before["cosine"], before["mse"])
    for epoch in range(cfg.epochs):
        model.train()
        total, n = 0.0, 0
        for x, y in tqdm(
            loader, desc=f"distill {epoch + 1}/{cfg.epochs}", disable=None, leave=False
        ):
            pred = student.standardised(model.transform(x.to(dev)))
            loss = distill_loss(
                pred, (y.to(dev) - student.target_mean) / student.target_std, cfg.loss
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(x)
            n += len(x)
        rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / max(n, 1)}
        if val_loader:
            rec.update(
                {f"val_{k}": v for k, v in validate(model, val_loader).items() if k != "n_patches"}
            )
        history.append(rec)
        log.info("distill epoch %d: %s", epoch + 1, rec)
    save_student(out / "student.pt", model.encoder, params.student)
    metrics = {
        "method": cfg.method,
        "teacher_dim": teacher_dim,
        "train_slides": train_ids,
        "val_slides": val_ids,
        "history": history,
        "val_before": before,
        "val_after": history[-1] if history else None,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def save_student(path: Path, student: Student, spec: EncoderParams) -> None:
    tmp = atomic_path(path)
    torch.save(
        {
            "format": "efcm.student/1",
            "spec": spec.model_dump(mode="json"),
            "out_dim": student.out_dim,
            "state_dict": student.state_dict(),
        },
        tmp,
    )
    os.replace(tmp, path)


def load_student(path: str | Path) -> tuple[Student, EncoderParams]:
    """Load a student saved by `save_student`; returns (student in eval mode, its encoder spec)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "efcm.student/1":
        raise ValueError(f"{path}: not an efcm student checkpoint")
    spec = EncoderParams.model_validate({**ckpt["spec"], "weights": None})
    student = build_student(spec, int(ckpt["out_dim"]), warn_random=False)
    student.load_state_dict(ckpt["state_dict"])
    return student.eval(), spec
