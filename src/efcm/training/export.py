"""The deployable model package, and its one loader.

What ships is what was evaluated. A strategy's cross-validation trains one CLAM per fold (and, for
ETC, one fine-tuned student per fold) and scores each on the patients of its test fold; the
package ships all k fold models, unchanged, as one ensemble (`efcm.models.ensemble`): class
probabilities and attention averaged over the members. `model.json` says what its quoted metrics
estimate: the pooled out-of-fold figures of the evaluation row it was exported from are the
cross-validated estimate for one member on patients it never saw; the average of the k members is
not scored separately (it has no held-out patients left), and averaging members is not expected to
do worse than one member. `Package.member(k)` is fold k's model alone, so a test can check it
reproduces the evaluation's out-of-fold predictions exactly.

Files: `student.pt` (one student for every fold: Reuse, Retrain CLAM) or `student_fold_<k>.pt`
(ETC: fold k's fine-tuned student), `clam_fold_<k>.pt`; the CPU runtimes of `export.runtimes`
(`student.onnx`, `clam.onnx`, `student_int8.onnx`, each checked for parity with the torch model on
the evaluation slides: `efcm.training.runtimes`); and `model.json`: the strategy and its
evaluation row, the ensemble's layout, the encoder spec, the patch geometry the CLAMs were trained
on (read from the training coords files, never from params), the export's params, class names,
the metrics, the runtimes with their parity figures, versions and the sha256 of every file.
`efcm.runtimes.load_runtime` serves it (torch modules by `efcm.models.package.load_package`, the
one loader of the evaluation; or ONNX Runtime); both refuse a package whose files do not match
their hashes, or whose recorded geometry disagrees with its params.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from efcm import __version__, registry
from efcm.config import Params, params_to_dict
from efcm.errors import PackageError
from efcm.io.cache import SlideCache
from efcm.io.files import sha256_file
from efcm.io.manifest import Manifest
from efcm.io.package import FORMAT, geometry
from efcm.io.results import read_predictions, read_summary
from efcm.models.clam import load_clam
from efcm.models.ensemble import FoldEnsembleCLAM
from efcm.models.package import load_package
from efcm.models.students import load_student
from efcm.slides.patching import settings_changes
from efcm.training.runtimes import ParitySource, slide_source, write_runtimes

log = logging.getLogger(__name__)


def trained_geometry(patches_dir: Path, slide_ids: list[str], params: Params) -> dict[str, Any]:
    """The patch settings recorded in the coords files of `slide_ids` (the slides the fold models
    were trained and tested on): one set for all, equal to `params.patch` (else PackageError:
    exporting would serve patches unlike those the CLAMs were trained on)."""
    from efcm.slides.patching import patch_settings, read_patch_settings

    found: dict[str, list[str]] = {}
    seen: dict[str, dict[str, Any]] = {}
    for sid in slide_ids:
        path = patches_dir / "patches" / f"{sid}.h5"
        if not path.is_file():
            raise PackageError(f"{path}: the coords file of training slide {sid} is missing")
        settings = read_patch_settings(path)
        if settings is None:
            raise PackageError(
                f"{path}: records no patch settings (written by CLAM or an older efcm): rerun "
                "`efcm patch` so that the package knows the geometry its CLAMs were trained on"
            )
        key = json.dumps(geometry(settings), sort_keys=True)
        found.setdefault(key, []).append(sid)
        seen[key] = geometry(settings)
    if not seen:
        raise PackageError("no training slides to read the patch geometry from")
    if len(seen) > 1:
        (a, ids_a), (b, ids_b) = list(found.items())[:2]
        raise PackageError(
            f"the training slides were patched with different settings ({ids_a[0]} vs "
            f"{ids_b[0]}: {'; '.join(settings_changes(seen[a], seen[b]))}): re-patch them alike"
        )
    trained = next(iter(seen.values()))
    wanted = geometry(patch_settings(params.patch))
    if trained != wanted:
        raise PackageError(
            "params.yaml's patch section differs from the patching the CLAMs were trained on "
            f"({'; '.join(settings_changes(trained, wanted))}, coords files -> params): the "
            "package would serve other patches than it was evaluated on; rerun the pipeline or "
            "restore params"
        )
    return trained


def export_package(
    student_ckpt: str | Path,
    mil_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    metrics: dict[str, Any],
    patches_dir: str | Path,
    manifest: Manifest | None = None,
    *,
    cache: SlideCache | None = None,
    store_dir: Path | None = None,
) -> Path:
    """Assemble the package of the strategy output `mil_dir` (its summary.json names the
    strategy): its k fold CLAMs with the distilled student `student_ckpt`, or for a strategy that
    fine-tunes the student per fold, each fold's student. `metrics` is the evaluation's
    metrics.json: it must hold the strategy's row (what is shipped must have been evaluated).
    Then the CPU runtimes of `params.export.runtimes`, checked on the evaluation slides of
    `manifest` (gs:// slides staged into `cache`; their pixels read from the patch-shard store
    `store_dir` instead when given).

    The package is assembled in `<out>.part` and moved into place only when complete: an export
    that fails (a runtime that misses parity) leaves the previous package as it was."""
    mil_dir, out = Path(mil_dir), Path(out_dir)
    summary = read_summary(mil_dir)
    if summary.get("skipped"):
        raise PackageError(f"{mil_dir}: {summary.get('reason', 'skipped')}: nothing to export")
    name = registry.summary_strategy(summary, str(mil_dir))
    entry = registry.get(name)
    row = entry.row(params.distill.method)
    if row not in metrics or registry.TEACHER_ROW not in metrics:
        raise PackageError(
            f"the evaluation has no row {row!r} (and {registry.TEACHER_ROW!r}): only an evaluated "
            f"strategy can be exported (rows: {sorted(k for k in metrics if k != 'efficiency')})"
        )
    k = len(summary["folds"])
    clams = [f"clam_fold_{i}.pt" for i in range(k)]
    students = [f"student_fold_{i}.pt" for i in range(k)] if entry.per_fold_student else []
    sources = {f"clam_fold_{i}.pt": mil_dir / f"fold_{i}.pt" for i in range(k)}
    if entry.per_fold_student:
        sources.update({s: mil_dir / s for s in students})
    else:
        sources["student.pt"] = Path(student_ckpt)
    check_sources(sources)
    if params.export.runtimes and manifest is None:
        raise PackageError(
            f"export.runtimes is {list(params.export.runtimes)}: their parity is checked on the "
            "evaluation slides, so export needs the manifest (`efcm export --manifest`)"
        )
    _, _, tested = read_predictions(mil_dir / "predictions.csv", tuple(params.dataset.classes))
    patch = trained_geometry(Path(patches_dir), sorted(tested), params)

    tmp, pkg_files = part_dir(out, sources)
    student, spec = load_student(tmp / (students[0] if students else "student.pt"))
    members = [load_clam(tmp / c) for c in clams]
    check_widths(clams, members, student.out_dim, "CLAM")
    ensemble = FoldEnsembleCLAM(members, split=entry.per_fold_student)
    meta = package_meta(
        params,
        params.dataset.classes,
        entry,
        k,
        {"clams": clams, "students": students or ["student.pt"]},
        "mean of the members' class probabilities and attention",
        spec.model_dump(mode="json"),
        ensemble.in_dim,
        metrics,
        {"patch": patch, "clam": members[0].config()},
    )
    ex = params.export
    source = None
    if ex.runtimes:
        source = slide_source(
            manifest,
            Path(patches_dir),
            sorted(tested),
            calibration=ex.calibration_patches,
            max_patches=ex.parity_max_patches,
            cache=cache,
            store_dir=store_dir,
        )
    return finish_package(tmp, out, meta, pkg_files, list(ex.runtimes), source)


def check_widths(files: list[str], members: list[Any], dim: int, what: str) -> None:
    """PackageError when a fold member (a CLAM, a head; `files` its file names) does not take
    the student's `dim`-d features."""
    for f, m in zip(files, members, strict=True):
        if m.in_dim != dim:
            raise PackageError(
                f"{f}: the {what} takes {m.in_dim}-d features but the student outputs {dim}-d: "
                "the strategy was trained on other features"
            )


def check_sources(sources: dict[str, Path]) -> None:
    """PackageError naming the first of the package's source files that is missing."""
    for f, src in sources.items():
        if not src.is_file():
            raise PackageError(f"{src}: missing (needed for the package's {f})")


def part_dir(out: Path, sources: dict[str, Path]) -> tuple[Path, list[str]]:
    """`<out>.part`, emptied, with `sources` (package file name -> source) copied in; returns it
    and the package's file names, sorted."""
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f, src in sources.items():
        shutil.copy2(src, tmp / f)
    return tmp, sorted(sources)


def package_meta(
    params: Params,
    classes: Sequence[str],
    entry: registry.Strategy,
    k: int,
    files: dict[str, list[str]],
    combine: str,
    encoder: dict[str, Any],
    feature_dim: int,
    metrics: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """model.json's fields shared by slide and image packages (`extra`: the kind's own), before
    the runtimes and the files' hashes (`finish_package`): the strategy `entry`'s row, its `k`
    fold members (`files`: the member files by role, `students` among them), the `classes`, what
    the metrics
    estimate, the encoder spec, the params and the versions."""
    row = entry.row(params.distill.method)
    return {
        "format": FORMAT,
        "name": params.export.model_name,
        "classes": list(classes),
        "strategy": entry.name,
        "row": row,
        "distill_method": params.distill.method,
        "ensemble": {
            "members": k,
            **files,
            "per_fold_student": entry.per_fold_student,
            "combine": combine,
            "student_passes_per_patch": k if entry.per_fold_student else 1,
        },
        "estimate": (
            f"metrics['{row}'] are the pooled out-of-fold figures of the {k} fold models this "
            f"package averages: the cross-validated estimate for one fold model on patients it "
            f"never saw (intervals resample patients). The {k}-model average itself is not "
            "scored separately; averaging is not expected to do worse than one member."
        ),
        "encoder": encoder,
        "teacher": {"arch": params.teacher.arch, "weights": params.teacher.weights},
        "feature_dim": feature_dim,
        **extra,
        "params": params_to_dict(params),
        "metrics": metrics,
        "versions": {
            "efcm": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }


def finish_package(
    tmp: Path,
    out: Path,
    meta: dict[str, Any],
    pkg_files: list[str],
    runtimes: list[str],
    source: ParitySource | None,
) -> Path:
    """Write model.json into the assembled package `tmp` (its files and their sha256), then its
    CPU `runtimes` checked on `source` (`efcm.training.runtimes.write_runtimes`), model.json again
    with them; then move `tmp` to `out` (the previous package replaced only now)."""
    meta["files"] = pkg_files
    meta["sha256"] = {f: sha256_file(tmp / f) for f in pkg_files}
    (tmp / "model.json").write_text(json.dumps(meta, indent=2))
    section, written = write_runtimes(load_package(tmp), tmp, runtimes, source)
    meta["runtimes"] = section
    meta["versions"]["onnxruntime"] = ort.__version__
    meta["files"] = sorted(pkg_files + written)
    meta["sha256"] = {f: sha256_file(tmp / f) for f in meta["files"]}
    (tmp / "model.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
