"""One function per pipeline stage: paths + validated params in, files out.

The adapters (cli.py, the KFP components, dvc.yaml through the CLI) each make ONE call here, so a
stage
behaves the same wherever it runs. Stage names match params.yaml, dvc.yaml, components/ and the CLI.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from efcm.config import ConfigError, Params
from efcm.manifest import Manifest, read_manifest

log = logging.getLogger(__name__)


class BatchFailed(RuntimeError):
    """Every slide of a batch failed (some failures are reported in status.csv, not raised)."""


def _check_batch(
    rows: list[dict[str, Any]], what: str, fail_on: str = "all"
) -> list[dict[str, Any]]:
    """Raise BatchFailed when `fail_on` says so: `all` slides failed (default), `any` failed, or
    `never`. Failed slides are in the status CSV either way."""
    failed = [r for r in rows if r["status"] != "ok"]
    log.info("%s: %d/%d slides ok", what, len(rows) - len(failed), len(rows))
    for r in failed:
        log.warning("%s: %s %s: %s", what, r["slide_id"], r["status"], r["reason"])
    if failed and (fail_on == "any" or (fail_on == "all" and len(failed) == len(rows))):
        reasons = "; ".join(f"{r['slide_id']}: {r['reason']}" for r in failed[:3])
        which = "every slide" if len(failed) == len(rows) else f"{len(failed)} slide(s)"
        raise BatchFailed(f"{what}: {which} failed ({reasons})")
    return rows


def _read(manifest: str | Path, params: Params, shard: tuple[int, int] | None) -> Manifest:
    m = read_manifest(manifest, params.dataset.classes)
    if shard is None:
        return m
    from efcm.dataset import select_shard

    return select_shard(m, *shard)


def row_name(params: Params, strategy: str) -> str:
    """The evaluation row of a student strategy: `student.<distill.method>.<strategy>`."""
    return f"student.{params.distill.method}.{strategy}"


def student_checkpoint(path: str | Path) -> Path:
    """The student checkpoint: `path` itself, or `student.pt` in a distill output directory."""
    p = Path(path)
    return p / "student.pt" if p.is_dir() else p


def demo_data(
    out_dir: str | Path, params: Params, *, n_slides: int | None = None, seed: int | None = None
) -> Path:
    """Write the synthetic demo dataset; returns its manifest path."""
    from efcm.slides.synthetic import write_demo_dataset

    d = params.demo_data
    return write_demo_dataset(
        out_dir,
        n_slides or d.slides,
        seed=params.seed if seed is None else seed,
        size=d.size,
        mpp=d.mpp,
        levels=d.levels,
        level_factor=d.level_factor,
        slides_per_case=d.slides_per_case,
        tumour_fraction=d.tumour_fraction,
        classes=params.dataset.classes[:2],
    )


def patch(
    manifest: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    workers: int = 1,
    overwrite: bool = False,
    mpp_overrides: str | Path | None = None,
    shard: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Tissue + patch grid for every slide; `mpp_overrides` is a CSV (`slide_id, mpp`) that wins
    over the manifest and the slides' metadata; `shard` = (index, shard_size) patches only that
    shard of the manifest (see `efcm.dataset.select_shard`)."""
    from efcm.manifest import apply_mpp_overrides
    from efcm.slides.batch import patch_manifest

    slides = _read(manifest, params, shard)
    if mpp_overrides:
        slides = apply_mpp_overrides(slides, mpp_overrides)
    rows = patch_manifest(
        slides,
        out_dir,
        params.patch,
        workers=workers,
        overwrite=overwrite,
    )
    # a shard is part of a batch: `fail_on` is applied to the whole batch, by `gather`
    return _check_batch(rows, "patch", "never" if shard else params.patch.fail_on)


def extract(
    manifest: str | Path,
    patches_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    encoder: str = "teacher",
    student: str | Path | None = None,
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Features of every patched slide with the teacher, or with a distilled student checkpoint;
    `shard` = (index, shard_size) as for `patch`."""
    import torch

    from efcm.features import extract_manifest
    from efcm.models.encoders import EncoderWithTransform, build_backbone, sha256_file

    if encoder == "teacher":
        torch.manual_seed(params.seed)  # a random-init (demo) teacher is the same on every run
        backbone, sha = build_backbone(params.teacher)
        model, spec = EncoderWithTransform(backbone, params.teacher), params.teacher
    elif encoder == "student":
        from efcm.distill import load_student

        if not student:
            raise ConfigError(
                "extract with the student encoder needs the student checkpoint (distill)"
            )
        ckpt = student_checkpoint(student)
        net, spec = load_student(ckpt)
        model, sha = EncoderWithTransform(net, spec), sha256_file(ckpt)
    else:
        raise ConfigError(f"encoder must be 'teacher' or 'student', got {encoder!r}")
    model = model.to(memory_format=torch.channels_last)
    if torch.cuda.is_available():
        model = model.cuda()
    attrs = {
        "encoder": encoder,
        "arch": spec.arch,
        "weights_sha256": sha or f"random-init (seed {params.seed})",
        "input_size": spec.input_size,
        "resize": spec.resize,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "model_kwargs": dict(spec.model_kwargs),
    }
    rows = extract_manifest(
        model,
        _read(manifest, params, shard),
        patches_dir,
        out_dir,
        params.extract,
        attrs,
        overwrite=overwrite,
    )
    return _check_batch(rows, "extract", "never" if shard else "all")


def gather(
    shards: list[str | Path], out_dir: str | Path, what: str, fail_on: str = "all"
) -> list[dict[str, Any]]:
    """Merge the shards' patch or extract output folders into `out_dir` (see
    `efcm.dataset.merge_outputs`), then apply `fail_on` to the whole batch, as an unsharded
    `patch` / `extract` does (a shard alone never fails the run for its failed slides)."""
    from efcm.dataset import merge_outputs

    return _check_batch(merge_outputs(shards, out_dir), what, fail_on)


def distill(
    manifest: str | Path,
    patches_dir: str | Path,
    teacher_dir: str | Path,
    out_dir: str | Path,
    params: Params,
) -> dict[str, Any]:
    from efcm.distill import distill as run

    return run(
        read_manifest(manifest, params.dataset.classes), patches_dir, teacher_dir, out_dir, params
    )


def splits(
    manifest: str | Path,
    out_path: str | Path,
    params: Params,
    *,
    features_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Patient-level folds over the slides that extracted ok (when features_dir is given)."""
    from efcm.mil import make_splits, save_json
    from efcm.status import ok_slides

    available = ok_slides(Path(features_dir) / "status.csv") if features_dir else None
    result = make_splits(
        read_manifest(manifest, params.dataset.classes),
        params.dataset.classes,
        params.train_mil.folds,
        params.train_mil.val_fraction,
        params.seed,
        available,
    )
    save_json(Path(out_path), result)
    return result


def train_mil(
    manifest: str | Path,
    features_dir: str | Path,
    splits_path: str | Path,
    out_dir: str | Path,
    params: Params,
) -> dict[str, Any]:
    from efcm.mil import train_mil as run

    folds = json.loads(Path(splits_path).read_text())
    return run(
        read_manifest(manifest, params.dataset.classes), features_dir, folds, out_dir, params
    )


def _skipped(out_dir: str | Path, strategy: str, params: Params) -> dict[str, Any] | None:
    """When `strategy` is not in mil.strategies, write a summary saying so (evaluation leaves the
    row out) and return it."""
    if strategy in params.mil.strategies:
        return None
    from efcm.mil import save_json

    summary = {
        "strategy": strategy,
        "skipped": True,
        "reason": f"{strategy!r} is not in mil.strategies {list(params.mil.strategies)}",
    }
    save_json(Path(out_dir) / "summary.json", summary)
    log.info("%s: skipped (%s)", strategy, summary["reason"])
    return summary


def reuse(
    manifest: str | Path,
    teacher_mil_dir: str | Path,
    student_features_dir: str | Path,
    splits_path: str | Path,
    out_dir: str | Path,
    params: Params,
) -> dict[str, Any]:
    """Reuse CLAM: the teacher's fold CLAMs on the student's features."""
    from efcm.strategies import reuse as run

    if (skipped := _skipped(out_dir, "reuse", params)) is not None:
        return skipped
    folds = json.loads(Path(splits_path).read_text())
    return run(
        read_manifest(manifest, params.dataset.classes),
        teacher_mil_dir,
        student_features_dir,
        folds,
        out_dir,
        params,
    )


def etc(
    manifest: str | Path,
    patches_dir: str | Path,
    teacher_features_dir: str | Path,
    student: str | Path,
    splits_path: str | Path,
    out_dir: str | Path,
    params: Params,
) -> dict[str, Any]:
    """End2end Train CLAM on the IB top-K patches, then re-extraction and a new CLAM."""
    from efcm.strategies import etc as run

    if (skipped := _skipped(out_dir, "etc", params)) is not None:
        return skipped
    folds = json.loads(Path(splits_path).read_text())
    return run(
        read_manifest(manifest, params.dataset.classes),
        patches_dir,
        teacher_features_dir,
        student_checkpoint(student),
        folds,
        out_dir,
        params,
    )


def evaluate(
    predictions: dict[str, str | Path],
    out_dir: str | Path,
    params: Params,
    *,
    student: str | Path | None = None,
    manifest: str | Path | None = None,
    patches_dir: str | Path | None = None,
    masks_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of each named output dir of train-mil / a strategy; with `student`, teacher vs
    student cost too; with `manifest`, `patches_dir` and `masks_dir` (ground-truth tumour masks,
    `<slide_id>.png`), the attention localisation AUROC of the rows that saved attention.

    A strategy name (`reuse`, `retrain`, `etc`) becomes the row `student.<distill.method>.<name>`;
    a strategy that is not in mil.strategies, or whose stage skipped it, is left out.
    """
    from efcm.evaluate import evaluate as run
    from efcm.evaluate import localisation, measure_efficiency

    rows: dict[str, Path] = {}
    for name, folder in predictions.items():
        summary = Path(folder) / "summary.json"
        if name in ("reuse", "retrain", "etc"):
            if name not in params.mil.strategies or (
                summary.is_file() and json.loads(summary.read_text()).get("skipped")
            ):
                continue
            name = row_name(params, name)
        rows[name] = Path(folder)
    if not rows:
        raise ConfigError("evaluate needs at least one NAME=DIR of predictions")
    eff = measure_efficiency(params, student_checkpoint(student)) if student else None
    loc = None
    if manifest and patches_dir and masks_dir:
        m = read_manifest(manifest, params.dataset.classes)
        loc = {
            name: localisation(d, m, Path(patches_dir), Path(masks_dir)) for name, d in rows.items()
        }
    preds = {name: d / "predictions.csv" for name, d in rows.items()}
    return run(preds, out_dir, params, eff, loc)


def export(
    student: str | Path,
    mil_dir: str | Path,
    out_dir: str | Path,
    params: Params,
    *,
    metrics_path: str | Path | None = None,
) -> Path:
    from efcm.export import export_package

    metrics = json.loads(Path(metrics_path).read_text()) if metrics_path else None
    return export_package(student_checkpoint(student), mil_dir, out_dir, params, metrics)


def gate(metrics_path: str | Path, out_dir: str | Path, params: Params):
    """The promotion gate on an evaluation's metrics.json: `decision.json` and `decision.md` in
    `out_dir`; returns the `efcm.gate.Decision` (not promoting is a result, not an error)."""
    from efcm.gate import decide, write_decision

    decision = decide(json.loads(Path(metrics_path).read_text()), params)
    write_decision(decision, out_dir)
    log.info("gate: %s", decision.reason)
    return decision


def report(patches_dir: str | Path, mil_dir: str | Path, out: str | Path, params: Params) -> Path:
    """The run's HTML page: attention heatmaps of `mil_dir`'s out-of-fold predictions over the
    patching QC thumbnails, and every slide's patching status (see `efcm.report`)."""
    from efcm.report import html_report

    return html_report(patches_dir, mil_dir, out, params.dataset.classes)
