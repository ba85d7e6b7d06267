"""The package of an image-level strategy: what ships is what was evaluated, as for slides
(`efcm.training.export`, whose rules and format this follows; `kind: image`).

An image strategy's cross-validation trains one linear head per fold (and, for `finetune`, one
fine-tuned student per fold) and scores each on the patients of its test fold; the package ships
all k of them, unchanged, as one ensemble (`efcm.models.image_head.ImageHeadEnsemble`): the
members' class probabilities averaged. `Package.member(k)` is fold k's model alone, and
reproduces the evaluation's out-of-fold predictions of fold k's test images.

Files: `student.pt` (one student for every fold: Reuse, Retrain) or `student_fold_<k>.pt`
(`finetune`), `head_fold_<k>.pt`; the CPU runtimes of `export.runtimes` (`student.onnx`,
`head.onnx`, `student_int8.onnx`), each checked for parity with the torch model on the
evaluation images (`efcm.training.runtimes`: every image the strategy scored, up to
`export.parity_max_images` of them evenly spaced, each a bag of one); and `model.json`:

- `kind: image`, the strategy and its evaluation row, the ensemble's layout, the encoder spec
  (the student's, at the task's image size and normalisation), the teacher;
- `image`: the preprocessing the heads were trained and evaluated on, read from the student's
  image features file (never from params), and refused when params.yaml now says otherwise;
- `multi_label` and, for a multi-label task, `thresholds`: the class thresholds the evaluation
  picked on each fold's validation images (metrics.json `thresholds`), per fold
  (`per_fold`, which `member(k)` uses) and their mean per class (`per_class`, which the
  ensemble's call uses: an image is called positive for a class when the averaged probability
  reaches it). Those calls are not scored separately (the pooled out-of-fold F1 in the metrics is
  the per-fold models' at their own thresholds); `estimate` says so;
- the metrics, versions, and the sha256 of every file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from efcm import registry
from efcm.config import EncoderParams, Params
from efcm.errors import PackageError
from efcm.features import read_extract_settings
from efcm.image_features import image_features_path
from efcm.images.reader import ImageReader
from efcm.io.cache import SlideCache
from efcm.io.image_manifest import ImageManifest, LabelSpace
from efcm.io.package import IMAGE, image_geometry
from efcm.io.results import read_summary
from efcm.models.image_head import ImageHeadEnsemble, load_head
from efcm.models.students import load_student
from efcm.slides.patching import settings_changes
from efcm.training.export import (
    check_sources,
    check_widths,
    finish_package,
    package_meta,
    part_dir,
)
from efcm.training.runtimes import (
    CALIBRATION_SEED,
    IMAGE_HEAD_ONNX,
    ParitySource,
    SlideSample,
)

log = logging.getLogger(__name__)

# the encoder settings an image features file records that the package's encoder must equal
ENCODER_KEYS = ("arch", "input_size", "resize", "mean", "std")


def _stored_settings(student_features: str | Path) -> tuple[Path, dict[str, Any]]:
    """(the student's features file, its extraction settings): the attributes only, not the
    (N, D) features, which export does not need.

    Raises:
        FileNotFoundError: no such file (as `read_image_features` says it).
    """
    path = image_features_path(student_features)
    if not path.is_file():
        raise FileNotFoundError(f"image features not found: {path} (run extract --kind image)")
    return path, read_extract_settings(path) or {}


def trained_image_geometry(student_features: str | Path, params: Params) -> dict[str, Any]:
    """The preprocessing recorded in the student's image features file (the pixels the heads were
    trained and evaluated on), equal to `params.image`'s (else PackageError: the package would
    serve images prepared otherwise than those it was evaluated on)."""
    path, settings = _stored_settings(student_features)
    stored = settings.get("preprocess")
    if stored is None:
        raise PackageError(
            f"{path}: records no image preprocessing (written by another tool or an older "
            "efcm): rerun `efcm extract --kind image` so that the package knows the pixels its "
            "heads were trained on"
        )
    trained = image_geometry(stored)
    wanted = image_geometry(params.image.model_dump(mode="json"))
    if trained != wanted:
        raise PackageError(
            "params.yaml's image section differs from the preprocessing the heads were trained "
            f"on ({'; '.join(settings_changes(trained, wanted))}, features file -> params): the "
            "package would serve other pixels than it was evaluated on; rerun the pipeline or "
            "restore params"
        )
    return trained


def _check_encoder(student_features: str | Path, spec: EncoderParams) -> None:
    """The package's encoder transform must be the one the student's features were made with."""
    path, stored = _stored_settings(student_features)
    mine = json.loads(json.dumps(spec.model_dump(mode="json")))
    diff = [
        f"{k} {stored.get(k)!r} -> {mine.get(k)!r}"
        for k in ENCODER_KEYS
        if k in stored and _plain(stored[k]) != _plain(mine.get(k))
    ]
    if diff:
        raise PackageError(
            f"{path}: the student's features were made with another input transform than the "
            f"package's encoder ({'; '.join(diff)}): rerun the student's extraction"
        )


def _plain(v: Any) -> Any:
    return [float(x) for x in v] if isinstance(v, list | tuple) else v


def package_thresholds(row: dict[str, Any], k: int, classes: list[str]) -> dict[str, Any]:
    """model.json's `thresholds` of a multi-label row (see the module docstring).

    Raises:
        PackageError: the evaluation row records no thresholds for every fold.
    """
    picked = row.get("thresholds") or {}
    missing = [i for i in range(k) if str(i) not in picked]
    if missing:
        raise PackageError(
            f"the evaluation row records no class thresholds for fold(s) {missing}: re-run "
            "evaluate (a multi-label package calls classes at the thresholds it picked)"
        )
    per_fold = [[float(x) for x in picked[str(i)]["thresholds"]] for i in range(k)]
    if any(len(t) != len(classes) for t in per_fold):
        raise PackageError(f"the evaluation's thresholds are not one per class of {classes}")
    return {
        "per_class": [round(float(x), 6) for x in np.mean(per_fold, axis=0)],
        "per_fold": per_fold,
        "rule": "a class is called when its probability reaches its threshold (>=)",
        "picked": "per fold, the threshold of maximal F1 on that fold's validation images "
        "(never its test images; 0.5 where they hold one value only); per_class is their mean, "
        "used on the ensemble's averaged probabilities (its calls are not scored separately)",
    }


def image_source(
    pkg_params: Params,
    images: ImageManifest,
    tested: list[str],
    train: list[str],
    cache: SlideCache | None,
) -> ParitySource:
    """The evaluation images `tested` (each a bag of one, up to `export.parity_max_images`
    evenly spaced) and `export.calibration_patches` images drawn from `train` with a fixed seed,
    read and preprocessed as the package serves them (`ImageReader`)."""
    reader = ImageReader(pkg_params.image, images.base_dir, cache)
    by_id = {e.image_id: e for e in images.images}
    ex = pkg_params.export
    pick = np.unique(
        np.linspace(0, len(tested) - 1, min(len(tested), ex.parity_max_images)).round()
    ).astype(int)

    def samples() -> Iterator[SlideSample]:
        for i in pick:
            sid = tested[i]
            yield SlideSample(sid, reader(by_id[sid])[None])

    def calibration() -> np.ndarray:
        rng = np.random.default_rng(CALIBRATION_SEED)
        n = min(len(train), ex.calibration_patches)
        ids = [train[i] for i in np.sort(rng.choice(len(train), size=n, replace=False))]
        return np.stack([reader(by_id[s]) for s in ids])

    return ParitySource(
        samples=samples,
        calibration=calibration,
        unit="images",
        pixels="the evaluation images, read and preprocessed as the server does",
        max_per_sample=1,
        drawn_from="the training images",
        head_file=IMAGE_HEAD_ONNX,
    )


def _tested_ids(strategy_dir: Path) -> list[str]:
    import csv

    with open(strategy_dir / "predictions.csv", newline="") as f:
        return sorted({r["image_id"] for r in csv.DictReader(f)})


def export_image_package(
    student_ckpt: str | Path,
    strategy_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    metrics: dict[str, Any],
    student_features: str | Path,
    images: ImageManifest,
    splits: dict[str, Any],
    *,
    cache: SlideCache | None = None,
) -> Path:
    """Assemble the package of the image strategy output `strategy_dir` (its summary.json names
    the strategy): its k fold heads with the distilled student `student_ckpt`, or for `finetune`
    each fold's student. `metrics` is the evaluation's metrics.json: it must hold the strategy's
    row (what is shipped must have been evaluated). `student_features` is the student's image
    features (the preprocessing the heads were trained on); `images` and `splits` give the
    evaluation and training images the CPU runtimes are checked and calibrated on (gs:// images
    staged into `cache`).

    Assembled in `<out>.part` and moved into place only when complete, as a slide package."""
    src_dir, out = Path(strategy_dir), Path(out_dir)
    summary = read_summary(src_dir)
    if summary.get("skipped"):
        raise PackageError(f"{src_dir}: {summary.get('reason', 'skipped')}: nothing to export")
    name = registry.summary_strategy(summary, str(src_dir))
    if name not in registry.IMAGE_STRATEGIES:
        raise PackageError(f"{src_dir}: {name!r} is not an image strategy")
    entry = registry.get(name, image=True)
    row = entry.row(params.distill.method)
    if row not in metrics or registry.TEACHER_ROW not in metrics:
        raise PackageError(
            f"the evaluation has no row {row!r} (and {registry.TEACHER_ROW!r}): only an evaluated "
            f"strategy can be exported (rows: {sorted(k for k in metrics if k != 'efficiency')})"
        )
    space = LabelSpace.of(params.image)
    k = len(summary["folds"])
    heads = [f"head_fold_{i}.pt" for i in range(k)]
    students = [f"student_fold_{i}.pt" for i in range(k)] if entry.per_fold_student else []
    sources = {heads[i]: src_dir / f"fold_{i}.pt" for i in range(k)}
    if entry.per_fold_student:
        sources.update({s: src_dir / s for s in students})
    else:
        sources["student.pt"] = Path(student_ckpt)
    check_sources(sources)
    pixels = trained_image_geometry(student_features, params)

    tmp, pkg_files = part_dir(out, sources)
    student, spec = load_student(tmp / (students[0] if students else "student.pt"))
    spec = params.image.encoder_spec(spec)
    if not entry.per_fold_student:
        _check_encoder(student_features, spec)
    members = [load_head(tmp / h) for h in heads]
    check_widths(heads, members, student.out_dim, "head")
    for h, m in zip(heads, members, strict=True):
        if m.n_classes != len(space.classes) or m.multi_label != space.multi_label:
            raise PackageError(
                f"{h}: a head for {m.n_classes} classes (multi_label {m.multi_label}), the task "
                f"has {list(space.classes)} (multi_label {space.multi_label})"
            )
    ensemble = ImageHeadEnsemble(members, split=entry.per_fold_student)
    meta = package_meta(
        params,
        space.classes,
        entry,
        k,
        {"heads": heads, "students": students or ["student.pt"]},
        "mean of the members' class probabilities",
        spec.model_dump(mode="json"),
        ensemble.in_dim,
        metrics,
        {"kind": IMAGE, "multi_label": space.multi_label, "image": pixels,
         "head": members[0].config()},
    )  # fmt: skip
    if space.multi_label:
        meta["thresholds"] = package_thresholds(metrics[row], k, list(space.classes))
    ex = params.export
    source = None
    if ex.runtimes:
        train = sorted({s for fold in splits["folds"] for s in fold["train"]})
        source = image_source(params, images, _tested_ids(src_dir), train, cache)
    return finish_package(tmp, out, meta, pkg_files, list(ex.runtimes), source)
