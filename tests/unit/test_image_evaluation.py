"""The evaluation table on image strategies: the teacher probe and the student heads scored on the
same out-of-fold images, patient-level intervals, paired deltas, multi-label thresholds from the
validation predictions, and the gate reading the image table's headline AUROC unchanged."""

import json

import numpy as np
import pytest

from efcm.config import params_from_dict
from efcm.evaluation.gate import decide
from efcm.evaluation.metrics import multilabel_scores, threshold_by_fold
from efcm.evaluation.table import evaluate
from efcm.io.results import VAL_PREDICTIONS, read_folds, read_predictions
from efcm.training.image_heads import image_features, image_splits, reuse_heads, train_heads
from tests.conftest import tiny_params_dict
from tests.unit.test_image_heads import BINARY, FAST, MULTI, _cohort, _features

ROW = "student.vfd.retrain"


def _run(tmp_path, space):
    """Teacher probe, Reuse and Retrain on one cohort; returns (predictions, cases, manifest)."""
    m = _cohort(space)
    x, ids = _features(m, space)
    noisy = x + np.random.default_rng(1).normal(0, 0.3, x.shape).astype(np.float32)
    splits = image_splits(m, space, 3, 0.25, seed=0)
    teacher, student = image_features(x, ids, m, space), image_features(noisy, ids, m, space)
    train_heads(teacher, splits, tmp_path / "teacher", FAST, seed=0)
    reuse_heads(tmp_path / "teacher", student, splits, tmp_path / "reuse", "vfd")
    train_heads(student, splits, tmp_path / "retrain", FAST, seed=0)
    predictions = {
        "teacher": tmp_path / "teacher" / "predictions.csv",
        "student.vfd.reuse": tmp_path / "reuse" / "predictions.csv",
        ROW: tmp_path / "retrain" / "predictions.csv",
    }
    return predictions, {e.image_id: e.case_id for e in m.images}


def test_multilabel_table_scores_every_row_on_the_same_patient_resamples(tmp_path):
    params = params_from_dict(tiny_params_dict())
    predictions, cases = _run(tmp_path, MULTI)
    metrics = evaluate(predictions, tmp_path / "eval", params, cases=cases, space=MULTI)
    teacher, student = metrics["teacher"], metrics[ROW]
    assert student["n"] == 60 and student["n_cases"] == 30
    # the headline is the macro AUROC of the per-class AUROCs, with its interval
    per_class = [teacher[f"auc_{c}"] for c in MULTI.classes]
    assert teacher["auc"] == pytest.approx(np.mean(per_class), abs=1e-5)
    assert teacher["auc_ci_low"] <= teacher["auc"] <= teacher["auc_ci_high"]
    # F1 at thresholds picked on each fold's validation predictions, recorded per fold
    path = predictions["teacher"]
    probs, targets, _ = read_predictions(path, MULTI.classes, multi_label=True)
    val = path.with_name(VAL_PREDICTIONS)
    vp, vt, _ = read_predictions(val, MULTI.classes, multi_label=True)
    called, picked = threshold_by_fold(probs, read_folds(path), vp, vt, read_folds(val))
    assert teacher["thresholds"] == json.loads(json.dumps({str(k): v for k, v in picked.items()}))
    expect = multilabel_scores(probs, targets, called, MULTI.classes, n_bootstrap=0).point
    assert teacher["f1"] == pytest.approx(expect["f1"], abs=1e-5)
    # paired deltas on the student rows only, the same resamples (same drops) for every row
    assert "delta_auc" not in teacher
    assert student["delta_auc"] == pytest.approx(student["auc"] - teacher["auc"], abs=2e-6)
    assert {"delta_f1_ci_low", "delta_auc_nodule_ci_high"} <= set(student)
    assert student["bootstrap_dropped"] == teacher["bootstrap_dropped"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "60 images of 30 patients" in report and "macro AUROC" in report
    assert (tmp_path / "eval" / "roc" / f"{ROW}.nodule.csv").is_file()
    # the gate reads the image table's headline unchanged
    params = params_from_dict({**tiny_params_dict(), "deploy": {"max_auc_drop": 1.0}})
    d = decide({"strategy": "retrain", "row": ROW, "metrics": metrics}, params.deploy)
    assert d.student_auc == pytest.approx(student["auc"]) and d.delta_auc_ci_low is not None
    assert d.teacher_auc == pytest.approx(teacher["auc"])


def test_multilabel_table_needs_the_validation_predictions(tmp_path):
    params = params_from_dict(tiny_params_dict())
    predictions, cases = _run(tmp_path, MULTI)
    (tmp_path / "retrain" / VAL_PREDICTIONS).unlink()
    with pytest.raises(FileNotFoundError, match="validation predictions"):
        evaluate(predictions, tmp_path / "eval", params, cases=cases, space=MULTI)


def test_multiclass_image_table_is_the_slide_table_by_image(tmp_path):
    params = params_from_dict(tiny_params_dict())
    predictions, cases = _run(tmp_path, BINARY)
    metrics = evaluate(predictions, tmp_path / "eval", params, cases=cases, space=BINARY)
    assert metrics[ROW]["n"] == 60 and metrics[ROW]["n_cases"] == 30
    assert {"acc", "balanced_acc", "delta_balanced_acc", "confusion"} <= set(metrics[ROW])
    assert metrics["teacher"]["auc"] > 0.8
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "Image-level metrics" in report and "every image, the test folds' images" in report


def test_folds_without_validation_images_fall_back_to_half(tmp_path):
    m = _cohort(MULTI)
    x, ids = _features(m, MULTI)
    splits = image_splits(m, MULTI, 3, 0.25, seed=0)
    for f in splits["folds"]:  # every validation image moved to training
        f["train"], f["val"] = sorted(f["train"] + f["val"]), []
    data = image_features(x, ids, m, MULTI)
    train_heads(data, splits, tmp_path / "teacher", FAST, seed=0)
    assert read_folds(tmp_path / "teacher" / VAL_PREDICTIONS).size == 0  # a header only
    params = params_from_dict(tiny_params_dict())
    metrics = evaluate({"teacher": tmp_path / "teacher" / "predictions.csv"}, tmp_path / "e",
                       params, space=MULTI)  # fmt: skip
    for k in ("0", "1", "2"):
        assert metrics["teacher"]["thresholds"][k] == {
            "thresholds": [0.5] * 3,
            "fallback": [0, 1, 2],
        }
