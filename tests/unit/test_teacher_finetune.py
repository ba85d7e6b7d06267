"""The image teacher baseline fine-tuned end to end when asked (`image.teacher_finetune`): `efcm
train-mil --kind image` writes it into <out>/finetune, `efcm evaluate --kind image` adds the
`teacher.finetune` row and the fine-tuned student's paired deltas against it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from efcm import registry
from efcm.cli import main
from efcm.config import params_from_dict
from efcm.evaluation.metrics import bootstrap_scores, paired
from efcm.images.reader import ImageReader
from efcm.io.image_manifest import LabelSpace, read_image_manifest
from efcm.io.results import read_predictions
from efcm.models.encoders import build_backbone
from efcm.models.students import BackboneStudent
from efcm.training.image_distill import ImagePixels
from efcm.training.image_finetune import finetune_fold
from efcm.training.image_heads import image_splits, image_targets
from tests.conftest import _merge, tiny_image_params_dict

FAST = {"epochs": 2, "min_epochs": 1, "batch_size": 4, "lr": 1e-2, "num_workers": 0}
IMAGE = ["--kind", "image"]
M = ["--manifest", "data/manifest.csv"]
TUNED = registry.TEACHER_FINETUNE_ROW
VS = registry.TEACHER_FINETUNE_DELTA


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """By hand: the share of (positive, negative) pairs ranked right, ties counting half."""
    pos, neg = scores[labels == 1][:, None], scores[labels == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def _raw(teacher_finetune: bool) -> dict:
    over = {
        "image": {
            "folds": 2,
            "strategies": ["finetune"],
            "export_strategy": "finetune",
            "finetune": FAST,
            "teacher_finetune": teacher_finetune,
        }
    }
    return _merge(tiny_image_params_dict(), over)


def test_the_param_is_off_by_default():
    assert params_from_dict(tiny_image_params_dict()).image.teacher_finetune is False
    assert params_from_dict(_raw(True)).image.teacher_finetune is True


def test_fine_tuned_row_names_only_the_end_to_end_student_rows():
    assert registry.fine_tuned_row(registry.row_name("vfd", "finetune"))
    assert not registry.fine_tuned_row(registry.row_name("vfd", "retrain"))
    assert not registry.fine_tuned_row(registry.TEACHER_ROW)
    assert not registry.fine_tuned_row(TUNED)


def test_the_teacher_is_fine_tuned_with_its_first_blocks_frozen(fundus_demo):
    """A ViT teacher wrapped for `finetune_fold`: its patch embedding, tokens and first
    `freeze_stages` blocks keep requires_grad False and their weights; the later blocks train."""
    params = params_from_dict(_raw(True))
    p = params.image
    space = LabelSpace.of(p)
    m = read_image_manifest(fundus_demo, space)
    fold = image_splits(m, space, 2, 0.34, seed=0)["folds"][0]
    reader = ImageReader(p, m.base_dir)
    by_id = {e.image_id: e for e in m.images}
    parts = {
        k: (ImagePixels([by_id[s] for s in fold[k]], reader), image_targets(m, space, fold[k], k))
        for k in ("train", "val", "test")
    }
    torch.manual_seed(0)
    backbone, _ = build_backbone(params.teacher, warn_random=False)
    before = {n: t.clone() for n, t in backbone.state_dict().items()}
    n = p.finetune.freeze_stages
    assert n == 2 and len(backbone.blocks) == 12
    model, info, _ = finetune_fold(
        BackboneStudent(backbone), p.encoder_spec(params.teacher), parts, space, p, 0,
        torch.device("cpu"),
    )  # fmt: skip
    tuned = model.student.backbone
    frozen = ("patch_embed.", "cls_token", "pos_embed", *(f"blocks.{i}." for i in range(n)))
    grads = dict(tuned.named_parameters())
    stem_and_first = [k for k in grads if k.startswith(frozen)]
    later = [k for k in grads if k.startswith(tuple(f"blocks.{i}." for i in range(n, 12)))]
    assert len(stem_and_first) > 2 * 4 and len(later) > 10 * 4
    assert not any(grads[k].requires_grad for k in stem_and_first)
    assert all(grads[k].requires_grad for k in later)
    after = tuned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in stem_and_first)
    assert any(not torch.equal(before[k], after[k]) for k in later if k.startswith("blocks.11."))
    assert info["trainable_parameters"] == sum(1 for t in grads.values() if t.requires_grad)


def _run(folder: Path, teacher_finetune: bool) -> Path:
    """The tiny fundus run up to the evaluation, with the finetune strategy only."""
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(_raw(teacher_finetune), sort_keys=False))
    steps = [
        ["demo-data", "data", "--kind", "fundus"],
        ["extract", *IMAGE, "--encoder", "teacher", *M, "--out", "teacher"],
        ["distill", *IMAGE, *M, "--teacher-features", "teacher", "--out", "distill"],
        ["splits", *IMAGE, *M, "--features", "teacher", "--out", "splits.json"],
        ["train-mil", *IMAGE, *M, "--features", "teacher", "--splits", "splits.json",
         "--out", "probe"],
        ["strategy", "finetune", *IMAGE, *M, "--splits", "splits.json", "--student", "distill",
         "--out", "strategies/finetune"],
        ["evaluate", *IMAGE, "--teacher-heads", "probe", "--strategy", "strategies/finetune", *M,
         "--out", "evaluate"],
    ]  # fmt: skip
    with contextlib.chdir(folder):
        for argv in steps:
            assert main(argv) == 0, argv
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The run with the teacher fine-tuned, and the same run without."""
    root = tmp_path_factory.mktemp("teacher_finetune")
    return _run(root / "on", True), _run(root / "off", False)


def test_train_mil_fine_tunes_the_teacher_per_fold_without_saving_its_weights(runs):
    on, off = runs
    tuned = on / "probe" / registry.TEACHER_FINETUNE_DIR
    names = sorted(f.name for f in tuned.iterdir())
    assert names == ["fold_0.pt", "fold_1.pt", "predictions.csv", "summary.json",
                     "val_predictions.csv"]  # fmt: skip
    summary = json.loads((tuned / "summary.json").read_text())
    assert summary["encoder"] == "teacher" and summary["arch"] == "vit_tiny_patch16_224"
    assert summary["encoder_weights"].startswith("not saved")
    assert summary["feature_dim"] == 192 and [f["fold"] for f in summary["folds"]] == [0, 1]
    # the student's fine-tune and the teacher's tested the same images on the same folds
    classes = params_from_dict(_raw(True)).image.classes
    _, _, teacher_ids = read_predictions(tuned / "predictions.csv", classes)
    _, _, student_ids = read_predictions(on / "strategies/finetune/predictions.csv", classes)
    assert sorted(teacher_ids) == sorted(student_ids)
    # the probe itself is the same with or without the fine-tune; off, no finetune folder
    for name in ("predictions.csv", "val_predictions.csv"):
        assert (on / "probe" / name).read_text() == (off / "probe" / name).read_text()
    assert not (off / "probe" / registry.TEACHER_FINETUNE_DIR).exists()


def test_evaluation_adds_the_fine_tuned_teacher_row_and_its_paired_deltas(runs):
    on, _ = runs
    params = params_from_dict(_raw(True))
    metrics = json.loads((on / "evaluate" / "metrics.json").read_text())
    student = registry.row_name("vfd", "finetune")
    assert list(metrics)[:3] == [registry.TEACHER_ROW, TUNED, student]
    row = metrics[TUNED]
    for k in ("auc", "balanced_acc", "f1"):
        assert row[f"{k}_ci_low"] <= row[k] <= row[f"{k}_ci_high"]
    assert not any(k.startswith("delta") for k in row)
    s = metrics[student]
    # by hand: the two predictions files, aligned by image id
    classes = params.image.classes
    space = LabelSpace.of(params.image)
    cases = {e.image_id: e.case_id for e in read_image_manifest(on / M[1], space).images}

    def read(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
        probs, labels, ids = read_predictions(path, classes)
        order = np.argsort(ids)
        return probs[order], labels[order], [ids[i] for i in order]

    sp, sy, ids = read(on / "strategies/finetune/predictions.csv")
    tp, ty, tids = read(on / "probe" / registry.TEACHER_FINETUNE_DIR / "predictions.csv")
    pp, _, _ = read(on / "probe/predictions.csv")
    assert ids == tids and np.array_equal(sy, ty)
    auc_s, auc_t, auc_p = (_auroc(sy, p[:, 1]) for p in (sp, tp, pp))
    assert s[f"delta_auc{VS}"] == pytest.approx(auc_s - auc_t, abs=2e-6)
    assert s["delta_auc"] == pytest.approx(auc_s - auc_p, abs=2e-6)  # still against the probe
    # the interval: the same paired bootstrap of the two files, on the same patient resamples
    ci = params.evaluate.ci
    kw = {"groups": [cases[i] for i in ids], "n_bootstrap": params.evaluate.bootstrap,
          "seed": params.seed}  # fmt: skip
    mine = paired(bootstrap_scores(sp, sy, 2, **kw), bootstrap_scores(tp, ty, 2, **kw), ci)
    for k in ("auc", "balanced_acc", "f1"):
        for end in ("_ci_low", "_ci_high"):
            assert s[f"delta_{k}{VS}{end}"] == pytest.approx(mine[f"delta_{k}{end}"], abs=2e-6)
    report = (on / "evaluate" / "report.md").read_text()
    assert f"| {TUNED} (teacher fine-tuned end to end) |" in report
    assert f"| {registry.TEACHER_ROW} (linear probe) |" in report
    assert f"delta AUC vs {TUNED} ({round(ci * 100)}% CI)" in report
    assert "## Student minus teacher linear probe (`teacher`; paired" in report


def test_without_the_param_the_evaluation_is_unchanged(runs):
    _, off = runs
    metrics = json.loads((off / "evaluate" / "metrics.json").read_text())
    assert TUNED not in metrics
    assert not any(VS in k for m in metrics.values() for k in m)
    report = (off / "evaluate" / "report.md").read_text()
    assert TUNED not in report and "(linear probe)" not in report
