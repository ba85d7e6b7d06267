"""The deployable model package, and its one loader.

A package is a directory with `student.pt` (the distilled student), `clam.pt` (the slide head
trained on
the student's features) and `model.json` (encoder spec and input transform, patch size, target mpp,
feature dim, class names, strategy, metrics, versions, sha256 of every file). `load_package` is
used by
evaluation, the CLI and the predictor alike; it refuses a package whose files do not match their
hashes.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from efcm import __version__
from efcm.config import EncoderParams, Params
from efcm.distill import load_student
from efcm.mil import load_clam, read_summary
from efcm.models.clam import CLAMBase
from efcm.models.encoders import EncoderWithTransform, sha256_file

log = logging.getLogger(__name__)

FORMAT = "efcm.package/1"
FILES = ("student.pt", "clam.pt")


class PackageError(ValueError):
    """A model package is missing, incomplete or corrupt."""


@dataclass
class Package:
    path: Path
    meta: dict[str, Any]
    encoder: EncoderWithTransform  # uint8 patches (B, S, S, 3) -> features (B, D)
    clam: CLAMBase

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def feature_dim(self) -> int:
        return int(self.meta["feature_dim"])


def export_package(
    student_ckpt: str | Path,
    mil_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Assemble the package from a strategy's output dir (train-mil = Retrain CLAM, reuse, etc):
    its CLAM of the fold with the lowest validation loss, and the student: the distilled one, or
    for ETC that fold's fine-tuned student. The recorded metrics are the out-of-fold estimates."""
    mil_dir, out = Path(mil_dir), Path(out_dir)
    summary = read_summary(mil_dir)
    if summary.get("skipped"):
        raise PackageError(f"{mil_dir}: {summary.get('reason', 'skipped')}: nothing to export")
    fold = int(summary["selected_fold"])
    if (mil_dir / f"student_fold_{fold}.pt").is_file():  # ETC fine-tuned the student per fold
        student_ckpt = mil_dir / f"student_fold_{fold}.pt"
    student, spec = load_student(student_ckpt)
    clam = load_clam(mil_dir / f"fold_{fold}.pt")
    if clam.in_dim != student.out_dim:
        raise PackageError(
            f"CLAM expects {clam.in_dim}-d features but the student outputs "
            f"{student.out_dim}-d: train-mil was run on other features"
        )
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(student_ckpt, tmp / "student.pt")
    shutil.copy2(mil_dir / f"fold_{fold}.pt", tmp / "clam.pt")
    meta = {
        "format": FORMAT,
        "name": params.export.model_name,
        "classes": list(params.dataset.classes),
        "strategy": summary.get("strategy", "retrain"),
        "distill_method": params.distill.method,
        "encoder": spec.model_dump(mode="json"),
        "teacher": {"arch": params.teacher.arch, "weights": params.teacher.weights},
        "feature_dim": student.out_dim,
        "patch": params.patch.model_dump(mode="json"),
        "clam": clam.config(),
        "clam_fold": fold,
        "metrics": metrics or {},
        "versions": {
            "efcm": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "sha256": {f: sha256_file(tmp / f) for f in FILES},
    }
    (tmp / "model.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def load_package(path: str | Path, *, verify: bool = True) -> Package:
    """Load a package directory; checks its format and the sha256 of every file."""
    path = Path(path)
    meta_path = path / "model.json"
    if not meta_path.is_file():
        raise PackageError(f"{path}: not a model package (no model.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise PackageError(
            f"{path}: unknown package format {meta.get('format')!r}, expected {FORMAT}"
        )
    for f in FILES:
        if not (path / f).is_file():
            raise PackageError(f"{path}: missing {f}")
        if verify and sha256_file(path / f) != meta["sha256"][f]:
            raise PackageError(f"{path}/{f}: sha256 does not match model.json (corrupt or altered)")
    student, spec = load_student(path / "student.pt")
    encoder = EncoderWithTransform(student, EncoderParams.model_validate(meta["encoder"])).eval()
    if spec.arch != meta["encoder"]["arch"]:
        raise PackageError(f"{path}: student arch {spec.arch} does not match model.json")
    return Package(path, meta, encoder, load_clam(path / "clam.pt"))
