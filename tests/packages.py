"""A model package made by hand, for tests and benchmarks that need one of a given feature width
or student encoder in well under a second.

It writes what the stages before export write (a strategy output dir with its fold CLAMs,
out-of-fold predictions.csv and summary.json; the evaluation's metrics with the strategy's row and
the teacher row; coords files that record the patch settings they were made with), then calls the
real `efcm.training.export.export_package`. The weights are random, so its predictions mean
nothing; its files, format and loader are the real ones. A package whose fold members reproduce an
evaluation comes from the demo stages instead (`tests.conftest.run_demo_pipeline`, the
`demo_package` fixture).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from efcm import registry
from efcm.config import FpdParams, Params, PatchParams, for_stage
from efcm.io.files import save_json
from efcm.io.manifest import Manifest, SlideEntry, write_manifest
from efcm.io.results import write_predictions
from efcm.models.clam import CLAMSB, save_clam
from efcm.models.students import build_fpd, build_vfd, save_student
from efcm.slides.patching import PatchGeometry, patch_settings, write_coords
from efcm.slides.synthetic import SlideSpec, write_slide
from efcm.training.export import export_package

SLIDES_PER_FOLD = 2
# a small CLAM head, so a package builds and loads fast
SMALL_CLAM = {"hidden": 16, "attn_dim": 8, "k_sample": 2}


def write_patches(patches_dir: Path, slide_ids: list[str], patch: PatchParams) -> Path:
    """`efcm patch`'s coords files for `slide_ids` (two patches each), recording `patch` as the
    settings that made them (what export reads the package's geometry from)."""
    size = patch.patch_size
    geom = PatchGeometry(
        patch_size=size,
        target_mpp=patch.target_mpp,
        mpp=patch.target_mpp,
        mpp_source="metadata",
        size0=size,
        step0=patch.step,
        patch_level=0,
        downsample=1.0,
        read_size=size,
        level_dim=(4 * size, 4 * size),
        dimensions=(4 * size, 4 * size),
    )
    coords = np.array([[0, 0], [patch.step, 0]], np.int64)
    settings = patch_settings(patch)
    for sid in slide_ids:
        write_coords(patches_dir / "patches" / f"{sid}.h5", coords, geom, sid, settings)
    return patches_dir


def write_strategy(
    out_dir: Path,
    name: str,
    clams: list[CLAMSB],
    classes: tuple[str, ...],
    students: list[tuple[torch.nn.Module, Any]] | None = None,
    fpd: FpdParams | None = None,
) -> list[str]:
    """A strategy output dir as `efcm strategy NAME` writes it: fold_<k>.pt, predictions.csv
    (SLIDES_PER_FOLD test slides per fold, made-up probabilities), summary.json, and with
    `students` ((model, spec) per fold; FPD ones with their `fpd` settings) student_fold_<k>.pt.
    Returns the tested slide ids."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, clam in enumerate(clams):
        save_clam(out_dir / f"fold_{k}.pt", clam, {"fold": k, "classes": list(classes)})
        if students:
            model, spec = students[k]
            save_student(out_dir / f"student_fold_{k}.pt", model, spec, fpd=fpd)
        for i in range(SLIDES_PER_FOLD):
            label = i % len(classes)
            probs = np.full(len(classes), 0.4 / max(len(classes) - 1, 1))
            probs[label] = 0.6
            rows.append(
                {
                    "slide_id": f"slide_{k}_{i}",
                    "fold": k,
                    "label": label,
                    **{f"prob_{c}": float(p) for c, p in zip(classes, probs, strict=True)},
                }
            )
    write_predictions(out_dir, rows)
    summary = {
        "strategy": name,
        "classes": list(classes),
        "feature_dim": clams[0].in_dim,
        "folds": [{"fold": k} for k in range(len(clams))],
    }
    save_json(out_dir / "summary.json", summary)
    return [r["slide_id"] for r in rows]


def metrics_for(row: str, auc: float = 0.9, teacher_auc: float = 0.92) -> dict[str, Any]:
    """An evaluation's metrics.json with the teacher row and `row` (its paired delta too)."""
    delta = auc - teacher_auc
    return {
        registry.TEACHER_ROW: {"auc": teacher_auc},
        row: {
            "auc": auc,
            "delta_auc": delta,
            "delta_auc_ci_low": delta - 0.02,
            "delta_auc_ci_high": delta + 0.02,
        },
    }


def build_package(
    out: Path,
    params: Params,
    dim: int,
    *,
    strategy: str = "retrain",
    folds: int = 2,
    clam: dict[str, Any] | None = None,
    seed: int = 0,
    fpd: FpdParams | None = None,
    runtimes: tuple[str, ...] = (),
) -> Path:
    """A real package of `strategy`'s `folds` fold models: a random `params.student` with `dim`-d
    output (the distilled student, `out/student.pt`; for a strategy that fine-tunes the student
    per fold, one more random student per fold too) and random CLAM-SB heads (`clam`: their
    keyword arguments, SMALL_CLAM by default). With `fpd`, the students are FPD students (the
    frozen shallow CNN of `params.student` and a TransScan of those settings) instead of VFD ones.
    Its metrics say it passes the gate's default rule. With `runtimes` (onnx, int8), it carries
    those CPU runtimes too, their parity measured on one small synthetic slide that every tested
    slide id names (a few seconds more); without, none (`export.runtimes: []`).
    Returns `out/package`; the strategy dir is `out/strategies/<strategy>`."""
    entry = registry.get(strategy)
    classes = tuple(params.dataset.classes)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)

    def student() -> torch.nn.Module:
        if fpd is None:
            return build_vfd(params.student, dim, warn_random=False)
        return build_fpd(params.student, dim, fpd, warn_random=False)

    save_student(out / "student.pt", student(), params.student, fpd=fpd)
    students = None
    if entry.per_fold_student:
        students = [(student(), params.student) for _ in range(folds)]
    kwargs = SMALL_CLAM if clam is None else clam
    clams = [CLAMSB(dim, len(classes), **kwargs) for _ in range(folds)]
    mil_dir = out / "strategies" / strategy
    tested = write_strategy(mil_dir, strategy, clams, classes, students, fpd)
    write_patches(out / "patch", tested, params.patch)
    metrics = metrics_for(entry.row(params.distill.method))
    (out / "metrics.json").write_text(json.dumps(metrics))
    export = params.export.model_copy(update={"runtimes": list(runtimes)})
    return export_package(
        out / "student.pt",
        mil_dir,
        out / "package",
        for_stage(params.model_copy(update={"export": export}), "export"),
        metrics,
        out / "patch",
        write_slide_manifest(out, tested, params.patch.patch_size) if runtimes else None,
    )


def write_slide_manifest(out: Path, slide_ids: list[str], patch_size: int) -> Manifest:
    """A manifest naming one small synthetic slide (`out/slide.tiff`) for every id of
    `slide_ids`: real pixels under the coords `write_patches` records."""
    write_slide(out / "slide.tiff", SlideSpec(8 * patch_size, 8 * patch_size, levels=1))
    entries = [SlideEntry(sid, sid, "slide.tiff", "") for sid in slide_ids]
    return write_manifest(out / "manifest.csv", entries)


def build_image_package(
    out: Path,
    params: Params,
    manifest: Path,
    student: torch.nn.Module,
    *,
    runtimes: tuple[str, ...] = (),
    fpd: FpdParams | None = None,
) -> Path:
    """A real image package of Retrain's fold heads on `student` (a model of `params.student`,
    an FPD one with `fpd` its settings, saved as out/student.pt), for benchmarks that need an
    image package of a given student: the student's image features of `manifest`
    (`efcm.stages.extract_images`), patient-level splits and Retrain's linear heads
    (`efcm.stages.image_strategy`), then the real
    `efcm.training.image_export.export_image_package`. Only the evaluation's metrics are made up
    (`metrics_for`: they pass the gate). With `runtimes` (onnx, int8), those CPU runtimes, whose
    parity export measures on the manifest's images. Returns out/package."""
    from efcm import stages
    from efcm.io.image_manifest import LabelSpace, read_image_manifest
    from efcm.training.image_export import export_image_package
    from efcm.training.image_heads import image_splits

    out.mkdir(parents=True, exist_ok=True)
    save_student(out / "student.pt", student, params.student, fpd=fpd)
    stages.extract_images(
        manifest, out / "student", params, encoder="student", student=out / "student.pt"
    )
    p = params.image
    images = read_image_manifest(manifest, LabelSpace.of(p))
    splits = image_splits(images, LabelSpace.of(p), p.folds, p.val_fraction, params.seed)
    save_json(out / "splits.json", splits)
    strategy = out / "strategies" / "retrain"
    stages.image_strategy(
        "retrain", manifest, out / "splits.json", strategy, params,
        student_features=out / "student",
    )  # fmt: skip
    metrics = metrics_for(registry.row_name(params.distill.method, "retrain"))
    export = params.export.model_copy(update={"runtimes": list(runtimes)})
    image = p.model_copy(update={"export_strategy": "retrain"})
    return export_image_package(
        out / "student.pt",
        strategy,
        out / "package",
        params.model_copy(update={"export": export, "image": image}),
        metrics,
        out / "student",
        images,
        splits,
    )
