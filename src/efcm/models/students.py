"""The distilled students, and their checkpoint format.

- `VFDStudent` (Vanilla Feature Distillation): the whole student, a timm backbone plus a linear
  projection to the teacher's dimension; everything is trained.
- `FPDStudent` (Feature Projection Distillation): the student's shallow CNN (its first stages,
  pretrained, frozen) feeds a trainable TransScan projection; only the projection is trained.
- `BackboneStudent`: what MCM-KD leaves after training: the student backbone alone, whose pooled
  features are not in the teacher's space (the context transformer and predictor are dropped).

VFD and FPD students predict *standardised* teacher features; `target_mean` / `target_std` (set from
the teacher features before distillation) map them back, so their output is in the teacher's space
while the loss weighs every teacher dimension by its spread, not by its (often large, shared) mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from efcm.config import EncoderParams, FpdParams
from efcm.io.cache import SlideCache
from efcm.io.checkpoints import load_checkpoint, save_checkpoint
from efcm.models.encoders import build_backbone, load_weights
from efcm.models.transscan import TransScan

FORMAT = "efcm.student/2"


class DistilledStudent(nn.Module):
    """A student whose output lives in the teacher's space: standardised prediction * std + mean.
    Subclasses define `standardised(x)`."""

    teacher_space = True

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.register_buffer("target_mean", torch.zeros(out_dim))
        self.register_buffer("target_std", torch.ones(out_dim))

    def set_target_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.target_mean.copy_(mean)
        self.target_std.copy_(std.clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardised(x) * self.target_std + self.target_mean  # (B, out_dim)


class VFDStudent(DistilledStudent):
    """Backbone + linear projection to the teacher's dimension, all trainable."""

    def __init__(self, backbone: nn.Module, out_dim: int) -> None:
        super().__init__(out_dim)
        self.backbone = backbone
        self.proj = nn.Linear(backbone.num_features, out_dim)

    def standardised(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(x))  # (B, 3, H, W) -> (B, out_dim)


class ShallowCNN(nn.Module):
    """The first `stage` feature stages of a timm CNN: (B, 3, H, W) -> (B, C, H/s, W/s)."""

    def __init__(self, arch: str, stage: int, **kwargs: Any) -> None:
        super().__init__()
        try:
            self.body = timm.create_model(
                arch, pretrained=False, features_only=True, out_indices=(stage,), **kwargs
            )
        except (RuntimeError, IndexError, TypeError) as err:
            raise ValueError(
                f"FPD: cannot cut {arch!r} after feature stage {stage}: {err}"
            ) from None
        self.channels = int(self.body.feature_info.channels()[-1])
        self.reduction = int(self.body.feature_info.reduction()[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[0]


class FPDStudent(DistilledStudent):
    """Frozen shallow CNN -> trainable TransScan -> teacher space. `fpd` is the configuration it
    was built with: `save_student` records it, so a fine-tuned copy reloads with its shapes."""

    def __init__(
        self,
        shallow: ShallowCNN,
        projection: TransScan,
        out_dim: int,
        fpd: FpdParams | None = None,
    ) -> None:
        super().__init__(out_dim)
        self.fpd = fpd
        self.shallow = shallow
        self.projection = projection
        for p in self.shallow.parameters():
            p.requires_grad_(False)
        self.shallow.eval()

    def train(self, mode: bool = True) -> FPDStudent:
        super().train(mode)
        self.shallow.eval()  # frozen: BatchNorm statistics too
        return self

    def standardised(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            fmap = self.shallow(x)
        return self.projection(fmap)


class BackboneStudent(nn.Module):
    """The student backbone alone (after MCM-KD): pooled features, not in the teacher's space."""

    teacher_space = False

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.out_dim = int(backbone.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, 3, H, W) -> (B, num_features)


def build_vfd(
    spec: EncoderParams,
    out_dim: int,
    *,
    warn_random: bool = True,
    cache: SlideCache | None = None,
) -> VFDStudent:
    backbone, _ = build_backbone(spec, warn_random=warn_random, cache=cache)
    return VFDStudent(backbone, out_dim)


def build_fpd(
    spec: EncoderParams,
    out_dim: int,
    cfg: FpdParams,
    *,
    warn_random: bool = True,
    cache: SlideCache | None = None,
) -> FPDStudent:
    """The student's first `cfg.shallow_stage` stages, with `spec.weights` loaded (pretrained; gs://
    staged into `cache`), and a fresh TransScan."""
    shallow = ShallowCNN(spec.arch, cfg.shallow_stage, **spec.model_kwargs)
    if spec.weights:
        load_weights(shallow.body, spec.weights, cache=cache)
    elif warn_random:
        import logging

        logging.getLogger(__name__).warning(
            "FPD: the frozen shallow CNN %s has NO pretrained weights (demo only): only the "
            "projection learns, on random features",
            spec.arch,
        )
    projection = TransScan(
        shallow.channels,
        out_dim,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        reduction=cfg.sk_reduction,
    )
    return FPDStudent(shallow, projection, out_dim, cfg)


def save_student(
    path: Path, student: nn.Module, spec: EncoderParams, *, fpd: FpdParams | None = None
) -> None:
    """Write a student checkpoint (atomic): its kind, encoder spec, config (an FPD student's
    `fpd`, else the one it was built with) and weights."""
    if isinstance(student, FPDStudent):
        kind, config = "fpd", (fpd or student.fpd or FpdParams()).model_dump(mode="json")
    elif isinstance(student, VFDStudent):
        kind, config = "vfd", {}
    elif isinstance(student, BackboneStudent):
        kind, config = "backbone", {}
    else:
        raise TypeError(f"not a student: {type(student).__name__}")
    save_checkpoint(
        path,
        FORMAT,
        {
            "kind": kind,
            "spec": spec.model_dump(mode="json"),
            "out_dim": student.out_dim,
            "config": config,
            "state_dict": student.state_dict(),
        },
    )


def load_student(path: str | Path) -> tuple[nn.Module, EncoderParams]:
    """Load a student saved by `save_student`; returns (student in eval mode, its encoder spec)."""
    ckpt = load_checkpoint(path, FORMAT, "student")
    spec = EncoderParams.model_validate({**ckpt["spec"], "weights": None})
    kind, out_dim = ckpt["kind"], int(ckpt["out_dim"])
    if kind == "vfd":
        student: nn.Module = build_vfd(spec, out_dim, warn_random=False)
    elif kind == "fpd":
        student = build_fpd(
            spec, out_dim, FpdParams.model_validate(ckpt["config"]), warn_random=False
        )
    elif kind == "backbone":
        student = BackboneStudent(build_backbone(spec, warn_random=False)[0])
    else:
        raise ValueError(f"{path}: unknown student kind {kind!r}")
    student.load_state_dict(ckpt["state_dict"])
    return student.eval(), spec
