"""End-to-end fine-tuning of the distilled student with a linear head: the third image-level
strategy, the image twin of the slide path's ETC (without its top-K selection: an image is one
input, not a bag of patches).

Per fold of `image_splits`, a fresh copy of the distilled student (`load_student`: its image
input transform travels with it) gets the heads' `LinearHead` on its features, standardised with
the training images' features of the distilled student; then both train together:

- the student's stem and first `image.finetune.freeze_stages` stages and every BatchNorm
  statistic stay frozen (`end2end.freeze_student`);
- AdamW with the head at `lr` and the student at `lr x backbone_lr_factor` (`two_rate_adamw`);
- cross-entropy, or BCE with logits for a multi-label task (`image_heads.head_loss`);
- augmentation of the training images (`end2end.augment`) as the task's `image.orientation`
  allows: `free` (fundus) any flip or quarter turn, `upright` (chest X-ray) a left-right mirror
  only, `fixed` none; a brightness jitter per channel, one gain for all three when
  `image.channels` is `grey`;
- mixed precision on CUDA; DataLoader workers read and preprocess the images (`ImageReader`);
- early stopping on the validation loss, the best epoch's student and head kept (the heads'
  `EarlyStopping`; the training loss where a fold has no validation images).

Outputs are the heads' (`image_heads.run_folds`: fold_<k>.pt the head, predictions.csv,
val_predictions.csv, summary.json), so evaluation, export and serving read every image strategy
alike; and student_fold_<k>.pt, fold k's fine-tuned student, which fold k's head takes (as ETC's).

The same code fine-tunes the teacher when `image.teacher_finetune` asks (`finetune_teacher`, run
by `efcm train-mil --kind image` into `<out>/finetune`: the evaluation's `teacher.finetune` row),
with the same `image.finetune` settings and splits, so the fine-tuned student has a fine-tuned
teacher to be compared with. The teacher, a bare timm backbone, is wrapped as a
`students.BackboneStudent` (its `backbone` and `out_dim` are all `finetune_fold` and
`freeze.freeze_stages` need: a ViT's stem is its patch embedding and tokens, its stages its
blocks). Its fine-tuned weights are not saved per fold (a ViT-L is 1.2 GB a fold): only the fold
heads and predictions, so that run is for evaluation, not for export.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from efcm.config import EncoderParams, ImageFinetuneParams, ImageParams
from efcm.images.reader import ImageReader
from efcm.io.cache import SlideCache
from efcm.io.files import save_json
from efcm.io.image_manifest import ImageManifest, LabelSpace
from efcm.models.encoders import PatchTransform
from efcm.models.freeze import freeze_batchnorm
from efcm.models.image_head import LinearHead
from efcm.models.students import BackboneStudent, load_student, save_student
from efcm.training.end2end import augment, freeze_student, mixed_precision, two_rate_adamw
from efcm.training.image_distill import ImagePixels
from efcm.training.image_heads import ImageJob, Part, head_loss, image_targets, run_folds
from efcm.training.mil import EarlyStopping

log = logging.getLogger(__name__)

FREEZE_KEY = "image.finetune.freeze_stages"
# what is fine-tuned: a module with a timm `backbone` and `out_dim` (a student, or the teacher
# wrapped as a BackboneStudent) and the encoder spec of its image input
Encoder = tuple[nn.Module, EncoderParams]


class ImageClassifier(nn.Module):
    """uint8 (B, S, S, 3) images -> logits: the encoder's input transform, the encoder (`student`:
    the distilled student, or the wrapped teacher), the head. `features` gives the encoder's
    (B, D) features in float32."""

    def __init__(self, transform: PatchTransform, student: nn.Module, head: LinearHead) -> None:
        super().__init__()
        self.transform, self.student, self.head = transform, student, head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(self.transform(x)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _Images(Dataset):
    """Item i = (the preprocessed uint8 (S, S, 3) image i, i), read in a DataLoader worker."""

    def __init__(self, pixels: ImagePixels) -> None:
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.ascontiguousarray(self.pixels.read(i))), i


def _loader(
    pixels: ImagePixels, cfg: ImageFinetuneParams, device: torch.device, seed: int | None
) -> DataLoader:
    """Batches of `pixels`: shuffled (each epoch a new order from `seed`), or in order (None)."""
    return DataLoader(
        _Images(pixels),
        batch_size=cfg.batch_size,
        shuffle=seed is not None,
        generator=None if seed is None else torch.Generator().manual_seed(seed),
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0 and seed is not None,  # the training epochs'
        pin_memory=device.type == "cuda",
    )


def _embed(
    model: ImageClassifier, loader: DataLoader, device: torch.device, amp: bool, dtype: Any
) -> torch.Tensor:
    """The student's features (N, D) float32 on the CPU of every image of `loader`, in order."""
    model.eval()
    feats = []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=amp):
        for x, _ in loader:
            feats.append(model.features(x.to(device, non_blocking=True)).float().cpu())
    return torch.cat(feats) if feats else torch.zeros(0, model.head.in_dim)


def finetune_fold(
    student: nn.Module,
    spec: EncoderParams,
    parts: dict[str, tuple[ImagePixels, torch.Tensor]],
    space: LabelSpace,
    image: ImageParams,
    seed: int,
    device: torch.device,
) -> tuple[ImageClassifier, dict[str, Any], dict[str, Part]]:
    """Fine-tune `student` (changed in place; a distilled student or the wrapped teacher: any
    module with a timm `backbone` and `out_dim`) with a new head on the "train" images of `parts`
    (pixels, targets), early-stopped on the "val" ones. Returns the classifier of the best epoch
    (on the CPU, eval mode), the fold's record (the EarlyStopping history, the learning rates,
    how many student parameters trained) and the (features, targets) of "test" and "val".

    Raises:
        ConfigError: `image.finetune.freeze_stages` is out of range or leaves nothing to train.
    """
    cfg = image.finetune
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    trainable = freeze_student(student, cfg.freeze_stages, FREEZE_KEY)
    head = LinearHead(student.out_dim, len(space.classes), space.multi_label)
    model = ImageClassifier(PatchTransform(spec), student, head).to(device)
    amp, dtype, scaler = mixed_precision(device)
    ordered = {p: _loader(px, cfg, device, None) for p, (px, _) in parts.items()}
    head.standardise_with(_embed(model, ordered["train"], device, amp, dtype))
    opt = two_rate_adamw(
        student, head.parameters(), cfg.lr, cfg.backbone_lr_factor, cfg.weight_decay
    )
    y_train, y_val = parts["train"][1], parts["val"][1]
    shuffled = _loader(parts["train"][0], cfg, device, seed)
    stopping = EarlyStopping(cfg.min_epochs, cfg.patience)
    for epoch in range(cfg.epochs):
        model.train()
        freeze_batchnorm(student)  # train() put the BatchNorms back in training mode
        total = 0.0
        for pixels, idx in shuffled:
            if cfg.augment:
                pixels = torch.from_numpy(
                    augment(
                        pixels.numpy(),
                        rng,
                        cfg.colour_jitter,
                        image.orientation,
                        per_channel=image.channels == "rgb",
                    )
                )
            y = y_train[idx].to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = head_loss(
                    model(pixels.to(device, non_blocking=True)).float(), y, space.multi_label
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.item() * len(idx)
        train_loss = total / len(y_train)
        val_loss = train_loss
        if len(y_val):
            with torch.no_grad():
                feats = _embed(model, ordered["val"], device, amp, dtype).to(device)
                val_loss = head_loss(head(feats), y_val.to(device), space.multi_label).item()
        log.info(
            "fine-tune epoch %d: train loss %.4f, val loss %.4f", epoch + 1, train_loss, val_loss
        )
        if stopping.step(model, epoch + 1, train_loss, val_loss):
            break
    info = stopping.finish(model)
    out = {p: (_embed(model, ordered[p], device, amp, dtype), parts[p][1]) for p in ("test", "val")}
    info["lr"] = {"head": opt.param_groups[1]["lr"], "student": opt.param_groups[0]["lr"]}
    info["trainable_parameters"] = len(trainable)
    return model.cpu().eval(), info, out


def finetune_images(
    manifest: ImageManifest,
    space: LabelSpace,
    encoder: str | Path | Encoder,
    splits: dict[str, Any],
    out_dir: str | Path,
    image: ImageParams,
    seed: int,
    *,
    save_encoder: bool = True,
    device: str | None = None,
    cache: SlideCache | None = None,
) -> dict[str, Any]:
    """Fine-tune an encoder with a linear head on each fold of `splits` (`image_splits`), a
    fresh copy per fold: the distilled student (`encoder` a student.pt), or any (module, spec)
    `Encoder` (the wrapped teacher). Writes out_dir/fold_<k>.pt (the head), predictions.csv,
    val_predictions.csv, summary.json (see the module docstring) and, with `save_encoder`,
    student_fold_<k>.pt (the fold's fine-tuned encoder, a student checkpoint). Images are read
    with `image`'s preprocessing, gs:// ones staged into `cache`; `device` defaults to CUDA when
    there is one.

    Raises:
        ValueError: the splits were made for other classes, or name an image the manifest does
            not label.
        ConfigError: `image.finetune.freeze_stages` is out of range for the encoder.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reader = ImageReader(image, manifest.base_dir, cache)
    by_id = {e.image_id: e for e in manifest.images}
    pretrained, spec = encoder if isinstance(encoder, tuple) else load_student(encoder)
    out = Path(out_dir)

    def fit(
        k: int, fold: dict[str, list[str]]
    ) -> tuple[LinearHead, dict[str, Any], dict[str, Part]]:
        parts = {}
        for p in ("train", "val", "test"):
            y = image_targets(manifest, space, fold[p], f"fold {k} {p}")  # checks the ids
            parts[p] = (ImagePixels([by_id[s] for s in fold[p]], reader), y)
        fresh = copy.deepcopy(pretrained)
        model, info, predicted = finetune_fold(fresh, spec, parts, space, image, seed + k, dev)
        if save_encoder:
            save_student(out / f"student_fold_{k}.pt", model.student, spec)
        return model.head, info, predicted

    return run_folds(splits, space, out, fit, len(manifest.unlabelled))


def run_finetune(job: ImageJob) -> dict[str, Any]:
    """Fine-tune (`efcm.registry.IMAGE_STRATEGIES`): `finetune_images` on the distilled student
    (`inputs.student`)."""
    if job.inputs.student is None:
        raise ValueError("finetune needs the distilled student (--student)")
    p = job.params
    space = LabelSpace.of(p.image)
    return finetune_images(
        job.images, space, job.inputs.student, job.splits, job.out_dir, p.image, p.seed,
        cache=job.cache,
    )  # fmt: skip


def finetune_teacher(
    manifest: ImageManifest,
    space: LabelSpace,
    backbone: nn.Module,
    spec: EncoderParams,
    splits: dict[str, Any],
    out_dir: str | Path,
    image: ImageParams,
    seed: int,
    *,
    cache: SlideCache | None = None,
) -> dict[str, Any]:
    """The teacher baseline fine-tuned end to end (`image.teacher_finetune`): `finetune_images`
    on the teacher `backbone` (a timm model with pooled features, as extraction builds it; left
    unchanged) wrapped as a `BackboneStudent`, `spec` its image encoder spec
    (`ImageParams.encoder_spec`). Writes the heads' layout into `out_dir`, not the fine-tuned
    teacher per fold (summary.json says so).

    Raises:
        ConfigError: `image.finetune.freeze_stages` is out of range for the teacher.
    """
    teacher = BackboneStudent(backbone)
    summary = finetune_images(
        manifest, space, (teacher, spec), splits, out_dir, image, seed,
        save_encoder=False, cache=cache,
    )  # fmt: skip
    summary.update(
        encoder="teacher",
        arch=spec.arch,
        encoder_weights="not saved: only the fold heads and predictions (a ViT-L teacher is "
        "1.2 GB a fold); this baseline is evaluated, not exported",
    )
    save_json(Path(out_dir) / "summary.json", summary)
    return summary
