"""Distillation on whole images (the image-level path): VFD and FPD (+ TransScan) as for
patches, on the images of an image manifest (labels unused: unlabelled images count) and the
teacher's image features (`efcm.image_features`).

Only the items differ from the slides' distillation: each item is (the preprocessed uint8 image,
its teacher feature), read by `ImageReader` in the DataLoader workers (`ImagePixels` in
distill's `PairDataset`, served by `MapSource`), and the training loop, DDP, checkpoints and
their resume, and metrics.json are `efcm.training.distill.train_student`'s. The student's input
transform is the task's `ImageParams.encoder_spec` (the whole image resized to the input, no
centre crop), and student.pt records it.

Validation holds out whole patients (`case_id`: both eyes, every view of a patient on one side),
`distill.val_fraction` of the cases, so no image is validated against its fellow eye's training;
metrics.json lists the cases (`train_cases`, `val_cases`). Images without teacher features (they
failed extraction; see its status.csv) are left out, and the log says how many.

MCM-KD is refused (`check_image_method`): it predicts the teacher's features of masked patches
from an s x s window of neighbouring tissue patches, and a whole image has no neighbours.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from efcm.config import ConfigError, DistillParams, Params
from efcm.features import features_identity
from efcm.image_features import ImageFeatures, preprocess_settings
from efcm.images.reader import ImageReader
from efcm.io.cache import SlideCache
from efcm.io.image_manifest import ImageEntry, ImageManifest
from efcm.training.distill import (
    DistillData,
    PairDataset,
    _fingerprint,
    split_slides,
    train_student,
)
from efcm.training.distributed import MapSource

log = logging.getLogger(__name__)

IMAGE_METHODS = ("vfd", "fpd")


def check_image_method(cfg: DistillParams) -> None:
    """Refuse a distillation method that cannot run on whole images.

    Raises:
        ConfigError: `distill.method` is `mcm`.
    """
    if cfg.method not in IMAGE_METHODS:
        raise ConfigError(
            f"distill.method {cfg.method!r} (MCM-KD) cannot distil on images: it predicts the "
            "teacher's features of masked patches from an s x s window of neighbouring tissue "
            "patches of a slide, and a single image has no such spatial context; use "
            f"{' or '.join(repr(m) for m in IMAGE_METHODS)} for the image path"
        )


class ImagePixels:
    """Whole images as distill's `Pixels`: item i is `entries[i]` read and preprocessed."""

    def __init__(self, entries: list[ImageEntry], reader: ImageReader) -> None:
        self.entries, self.reader = entries, reader

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, i: int) -> np.ndarray:
        return self.reader(self.entries[i])


def images_with_features(manifest: ImageManifest, teacher: ImageFeatures) -> list[ImageEntry]:
    """The manifest's images that have a teacher feature, in manifest order.

    Raises:
        ValueError: no image has one, or an image's feature was extracted from another file
            (its URI differs from the manifest's), naming it.
    """
    uris = dict(zip(teacher.image_ids, teacher.uris, strict=True))
    entries = [e for e in manifest.images if e.image_id in uris]
    for e in entries:
        if uris[e.image_id] != e.uri:
            raise ValueError(
                f"{e.image_id}: its teacher feature in {teacher.path} was extracted from "
                f"{uris[e.image_id]}, the manifest {manifest.path} says {e.uri} (re-run extract "
                "--kind image with this manifest)"
            )
    if not entries:
        raise ValueError(
            f"no image of {manifest.path} has a teacher feature in {teacher.path}: run `efcm "
            "extract --kind image --encoder teacher` on it first"
        )
    if len(entries) < len(manifest.images):
        log.info(
            "distill: %d of %d images have no teacher feature (failed extraction, see its "
            "status.csv): left out",
            len(manifest.images) - len(entries),
            len(manifest.images),
        )
    return entries


def _image_data(
    entries: list[ImageEntry],
    teacher: ImageFeatures,
    reader: ImageReader,
    params: Params,
    pin_memory: bool,
) -> DistillData:
    """Training and validation pairs, split by case (`distill.val_fraction` of the cases)."""
    cfg = params.distill
    rows = teacher.rows()
    train_cases, val_cases = split_slides(
        sorted({e.case_id for e in entries}), cfg.val_fraction, params.seed
    )

    def pairs(cases: list[str]) -> PairDataset:
        keep = set(cases)
        chosen = [e for e in entries if e.case_id in keep]
        targets = teacher.features[[rows[e.image_id] for e in chosen]]
        return PairDataset([ImagePixels(chosen, reader)], [targets])

    train = pairs(train_cases)
    val = pairs(val_cases) if val_cases else None
    source = MapSource(
        train, cfg.batch_size, params.seed, num_workers=cfg.num_workers, pin_memory=pin_memory
    )
    t = torch.from_numpy(train.targets[0])
    return DistillData(
        train_cases,
        val_cases,
        source,
        val,
        t.mean(0),
        t.std(0),
        unit="cases",
        pixels="images",
        spec=params.image.encoder_spec(params.student),
    )


def _teacher_identity(
    teacher: ImageFeatures, entries: list[ImageEntry], params: Params
) -> dict[str, Any]:
    """What a checkpoint must match besides the configuration: the teacher features file (its
    settings and shape), the images used (ids and URIs) and the preprocessing of their pixels."""
    items = json.dumps([(e.image_id, e.uri) for e in entries]).encode()
    pixels = preprocess_settings(params.image)
    pixels.update(params.image.model_dump(mode="json", include={"mean", "std"}))
    return {
        "features": features_identity(teacher.path),
        "images_sha256": hashlib.sha256(items).hexdigest(),
        "preprocess": pixels,
    }


def distill_images(
    manifest: ImageManifest,
    teacher: ImageFeatures,
    out_dir: str | Path,
    params: Params,
    *,
    cache: SlideCache | None = None,
) -> dict[str, Any]:
    """Train the student on the images of `manifest` and their `teacher` features (read by
    `read_image_features`); writes out_dir/student.pt, metrics.json and checkpoint.pt as
    `efcm.training.distill.distill` does (DDP under torchrun, resume; the CUDA device of the
    process when there is one). gs:// images and student weights are staged into `cache`.

    Raises:
        ConfigError: `distill.method` is `mcm` (see `check_image_method`).
        ValueError: no image has a teacher feature, or one was extracted from another file.
    """
    check_image_method(params.distill)
    entries = images_with_features(manifest, teacher)
    reader = ImageReader(params.image, manifest.base_dir, cache)

    def data(dev: torch.device) -> DistillData:
        return _image_data(entries, teacher, reader, params, dev.type == "cuda")

    def fingerprint(data: DistillData) -> str:
        identity = _teacher_identity(teacher, entries, params)
        return _fingerprint(params, data.teacher_dim, data.train_ids, identity)

    return train_student(data, fingerprint, out_dir, params, cache=cache)
