"""The image path through every `efcm` command, as dvc runs them (demo data, teacher and student
extraction, distillation, splits, the teacher probe, every image strategy, evaluation, export),
on a tiny synthetic demo: one helper, so the tests that check a run and those that serve its
package use the same run."""

from __future__ import annotations

import contextlib
from pathlib import Path

import yaml

from efcm import registry
from efcm.cli import main
from tests.conftest import _merge, tiny_image_params_dict

M = ["--manifest", "data/manifest.csv"]
IMAGE = ["--kind", "image"]
STRATEGIES = [a for n in registry.IMAGE_NAMES for a in ("--strategy", f"strategies/{n}")]


def cxr_params() -> dict:
    """The tiny multi-label chest X-ray run: 24 images (PNG and DICOM), 2 folds, MRM's pooling."""
    raw = _merge(tiny_image_params_dict(), {"image": {"preset": "cxr", "folds": 2}})
    raw["image"]["demo"] = {**raw["image"]["demo"], "images": 24}
    raw["teacher"]["preset"] = "mrm"
    return raw


def export_argv(out: str = "package", *extra: str) -> list[str]:
    """`efcm export --kind image` of the run's outputs into `out`."""
    return ["export", *IMAGE, "--student", "distill", *STRATEGIES, "--metrics",
            "evaluate/metrics.json", "--student-features", "student", *M, "--splits",
            "splits.json", "--out", out, *extra]  # fmt: skip


def run_image_cli(folder: Path, params: dict, kind: str = "cxr") -> Path:
    """Every image command in `folder` (params.yaml written from `params`); returns `folder`,
    holding data/, teacher/, distill/, student/, splits.json, probe/, strategies/<name>/,
    evaluate/ and package/ (image.export_strategy's)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    steps = [
        ["demo-data", "data", "--kind", kind],
        ["extract", *IMAGE, "--encoder", "teacher", *M, "--out", "teacher"],
        ["distill", *IMAGE, *M, "--teacher-features", "teacher", "--out", "distill"],
        ["extract", *IMAGE, "--encoder", "student", "--student", "distill", *M, "--out", "student"],
        ["splits", *IMAGE, *M, "--features", "teacher", "--out", "splits.json"],
        ["train-mil", *IMAGE, *M, "--features", "teacher", "--splits", "splits.json",
         "--out", "probe"],
    ]  # fmt: skip
    flags = {"teacher_heads": "probe", "student": "distill", "student_features": "student"}
    for name in registry.IMAGE_NAMES:
        entry = registry.get(name, image=True)
        given = [a for i in entry.inputs for a in (f"--{i.replace('_', '-')}", flags[i])]
        steps.append(["strategy", name, *IMAGE, *M, "--splits", "splits.json", *given,
                      "--out", f"strategies/{name}"])  # fmt: skip
    steps += [
        ["evaluate", *IMAGE, "--teacher-heads", "probe", *STRATEGIES, *M, "--out", "evaluate"],
        export_argv(),
    ]
    with contextlib.chdir(folder):
        for argv in steps:
            assert main(argv) == 0, argv
    return folder
