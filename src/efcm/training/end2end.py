"""Pieces shared by the end-to-end fine-tuning of a student with its head: the slide path's ETC
(`efcm.training.strategies`) and the image path's fine-tuning (`efcm.training.image_finetune`).

- `freeze_student`: the stem and the first stages frozen, every BatchNorm statistic kept
  (`efcm.models.freeze`), refusing a student with nothing left to train;
- `two_rate_adamw`: AdamW with the student's trainable parameters at `lr x backbone_lr_factor`
  and the head's at `lr`, so the pretrained (distilled) features move slowly;
- `mixed_precision`: autocast and gradient scaling on CUDA (bfloat16 where the GPU has it, else
  float16 with a scaler), nothing on the CPU;
- `augment` / `augment_draws`: flips, quarter turns and a mild brightness jitter of uint8
  images, drawn from a numpy generator in the main process (so the stream does not depend on the
  DataLoader's workers, and an ETC rank can draw another rank's share without the pixels).

Which geometric changes are allowed is the task's `orientation`: `free` (any flip or quarter
turn: the 8 symmetries of the square; tissue patches, fundus photographs), `upright` (only the
left-right mirror: a chest X-ray's top is the neck, so it is never flipped vertically or turned),
`fixed` (no geometric change).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
from torch import nn

from efcm.config import ConfigError
from efcm.models.freeze import freeze_batchnorm, freeze_stages

Orientation = Literal["free", "upright", "fixed"]
ORIENTATIONS: tuple[str, ...] = ("free", "upright", "fixed")


def freeze_student(student: nn.Module, n: int, key: str) -> list[str]:
    """Freeze `student`'s stem and first `n` stages and every BatchNorm (statistics and affine
    weights); returns the names of the parameters left trainable.

    Raises:
        ConfigError: `n` is out of range for the backbone, or leaves nothing to train (the
            message names the params `key`, e.g. ``image.finetune.freeze_stages``).
    """
    try:
        freeze_stages(student, n)
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None
    freeze_batchnorm(student)
    trainable = [name for name, p in student.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"{key}={n} freezes every student parameter: lower it")
    return trainable


def two_rate_adamw(
    student: nn.Module,
    head_parameters: Iterable[nn.Parameter],
    lr: float,
    backbone_lr_factor: float,
    weight_decay: float,
) -> torch.optim.AdamW:
    """AdamW over two groups: the student's trainable parameters at `lr * backbone_lr_factor`
    (group 0), the head's at `lr` (group 1)."""
    return torch.optim.AdamW(
        [
            {
                "params": [p for p in student.parameters() if p.requires_grad],
                "lr": lr * backbone_lr_factor,
            },
            {"params": list(head_parameters), "lr": lr},
        ],
        weight_decay=weight_decay,
    )


def mixed_precision(device: torch.device) -> tuple[bool, torch.dtype, torch.amp.GradScaler]:
    """(autocast on?, its dtype, the gradient scaler): on CUDA bfloat16 where supported, else
    float16 with loss scaling; off (a disabled scaler) on the CPU."""
    amp = device.type == "cuda"
    dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dtype == torch.float16)
    return amp, dtype, scaler


def augment_draws(
    rng: np.random.Generator,
    n: int,
    jitter: float,
    orientation: Orientation = "free",
    per_channel: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The random draws of `augment` for `n` images, image by image from `rng`: (mirror (n,)
    bool, quarter turns (n,) int, gains (n, 3) or None without jitter). With `free` and
    `per_channel` (ETC) each image draws a mirror, a turn and 3 gains; `upright` draws no turn,
    `fixed` neither; a single gain (brightness) is drawn without `per_channel`."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {list(ORIENTATIONS)}, got {orientation!r}")
    flips = np.zeros(n, bool)
    turns = np.zeros(n, np.int64)
    gains = np.empty((n, 3)) if jitter > 0 else None
    for i in range(n):
        if orientation != "fixed":
            flips[i] = rng.random() < 0.5
        if orientation == "free":
            turns[i] = int(rng.integers(4))
        if gains is not None:
            gains[i] = 1 + rng.uniform(-jitter, jitter, 3 if per_channel else 1)
    return flips, turns, gains


def augment(
    images: np.ndarray,
    rng: np.random.Generator,
    jitter: float,
    orientation: Orientation = "free",
    per_channel: bool = True,
) -> np.ndarray:
    """uint8 (N, S, S, 3) -> the same, each image with its random left-right mirror, quarter
    turn (as `orientation` allows) and a brightness gain of +-`jitter` per channel (colour), or
    one for all three (`per_channel` False: a grey image stays grey)."""
    flips, turns, gains = augment_draws(rng, len(images), jitter, orientation, per_channel)
    out = np.empty_like(images)
    for i, p in enumerate(images):
        if flips[i]:
            p = p[:, ::-1]
        p = np.rot90(p, int(turns[i]))
        if gains is not None:
            p = np.clip(p.astype(np.float32) * gains[i], 0, 255)
        out[i] = p
    return out
