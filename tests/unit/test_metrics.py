"""Patient-level bootstrap intervals, the paired student minus teacher delta, and the evaluation
table built from predictions files."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from efcm.config import params_from_dict
from efcm.evaluation.metrics import METRICS, case_resamples, classification_metrics, paired_delta
from efcm.evaluation.table import evaluate, flat_metrics
from tests.conftest import tiny_params_dict


def _noisy(n_cases: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Alternating labels and probabilities that separate them imperfectly."""
    rng = np.random.default_rng(seed)
    y = np.arange(n_cases) % 2
    p1 = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.25, n_cases), 0.01, 0.99)
    return np.stack([1 - p1, p1], 1).astype(np.float32), y


def test_case_resamples_draw_whole_cases_deterministically():
    groups = ["a", "a", "b", "c", "c", "c", "d"]
    case_of = dict(enumerate(groups))
    first = list(case_resamples(groups, 30, seed=3))
    assert all(
        np.array_equal(a, b) for a, b in zip(first, case_resamples(groups, 30, 3), strict=True)
    )
    assert any(
        not np.array_equal(a, b) for a, b in zip(first, case_resamples(groups, 30, 4), strict=True)
    )
    for idx in first:
        counts = np.bincount(idx, minlength=len(groups))
        draws = {}
        for row, n in enumerate(counts):  # every slide of a case comes as often as the case
            assert draws.setdefault(case_of[row], n) == n
        assert sum(draws.values()) == 4  # as many cases drawn as there are
    assert any(len(idx) != len(groups) for idx in first)


def test_case_resamples_do_not_depend_on_the_row_order():
    groups = ["a", "a", "b", "c", "c", "c", "d"]
    perm = [6, 3, 0, 5, 2, 1, 4]
    for idx, pidx in zip(
        case_resamples(groups, 20, 0),
        case_resamples([groups[i] for i in perm], 20, 0),
        strict=True,
    ):
        assert sorted(idx) == sorted(perm[i] for i in pidx)


def test_several_slides_of_a_case_do_not_narrow_the_interval():
    probs, y = _noisy(24)
    cases = [f"case{i:02d}" for i in range(24)]
    k = 3  # every case scanned three times, identically
    dup_probs, dup_y, dup_cases = np.repeat(probs, k, 0), np.repeat(y, k), np.repeat(cases, k)
    one = classification_metrics(probs, y, 2, groups=cases, n_bootstrap=300, seed=1)
    grouped = classification_metrics(
        dup_probs, dup_y, 2, groups=list(dup_cases), n_bootstrap=300, seed=1
    )
    slides = classification_metrics(dup_probs, dup_y, 2, n_bootstrap=300, seed=1)
    assert grouped["n"] == 72 and grouped["n_cases"] == 24 and slides["n_cases"] == 72
    for m in METRICS:
        for end in ("_ci_low", "_ci_high"):
            assert grouped[m + end] == pytest.approx(one[m + end], abs=1e-6)
    width = {
        name: r["auc_ci_high"] - r["auc_ci_low"] for name, r in [("g", grouped), ("s", slides)]
    }
    assert width["s"] < 0.8 * width["g"]  # slides taken as independent: falsely narrow


def test_one_class_resamples_are_counted_and_dropped_for_every_metric():
    y = np.array([0, 1, 1])
    probs = np.array([[0.4, 0.6], [0.3, 0.7], [0.8, 0.2]], np.float32)
    groups = ["p0", "p1", "p2"]
    m = classification_metrics(probs, y, 2, groups=groups, n_bootstrap=200, seed=5)
    # with 3 cases, 7 in 27 draws hold a single class
    assert m["bootstrap"] == 200 and 20 < m["bootstrap_dropped"] < 110
    kept_acc = []
    for idx in case_resamples(groups, 200, 5):
        if len(set(y[idx])) == 2:
            kept_acc.append(float((probs[idx].argmax(1) == y[idx]).mean()))
    assert len(kept_acc) == 200 - m["bootstrap_dropped"]
    # accuracy is defined on a one-class resample too, but those are left out as for AUC
    assert m["acc_ci_low"] == pytest.approx(np.quantile(kept_acc, 0.025), abs=1e-6)
    assert m["acc_ci_high"] == pytest.approx(np.quantile(kept_acc, 0.975), abs=1e-6)


def test_paired_delta_of_equal_models_contains_zero():
    probs, y = _noisy(30)
    groups = [f"c{i // 2}" for i in range(30)]
    d = paired_delta(probs, probs.copy(), y, 2, groups=groups, n_bootstrap=200, ci=0.95, seed=0)
    for m in ("auc", "balanced_acc", "f1"):
        assert d[f"delta_{m}"] == 0
        assert d[f"delta_{m}_ci_low"] <= 0 <= d[f"delta_{m}_ci_high"]
    assert d["delta_bootstrap_dropped"] == 0


def test_paired_delta_excludes_zero_when_the_student_is_worse_on_every_case():
    y = np.arange(20) % 2
    teacher = np.stack([1 - y, y], 1) * 0.8 + 0.1  # right on every case
    student = teacher[:, ::-1].copy()  # wrong on every case
    groups = [f"c{i}" for i in range(20)]
    d = paired_delta(student, teacher, y, 2, groups=groups, n_bootstrap=200, ci=0.95, seed=0)
    for m in ("auc", "balanced_acc", "f1"):
        assert d[f"delta_{m}"] < 0 and d[f"delta_{m}_ci_high"] < 0


def test_paired_delta_point_is_the_difference_and_shapes_are_checked():
    probs, y = _noisy(16, seed=1)
    other, _ = _noisy(16, seed=2)
    kw = {"groups": None, "n_bootstrap": 50, "ci": 0.9, "seed": 0}
    d = paired_delta(probs, other, y, 2, **kw)
    s = classification_metrics(probs, y, 2, n_bootstrap=0)
    t = classification_metrics(other, y, 2, n_bootstrap=0)
    assert d["delta_auc"] == pytest.approx(s["auc"] - t["auc"])
    assert d["delta_auc_ci_low"] <= d["delta_auc"] <= d["delta_auc_ci_high"]
    with pytest.raises(ValueError, match=r"student probs \[16, 2\] and teacher probs \[15, 2\]"):
        paired_delta(probs, other[:15], y, 2, **kw)
    with pytest.raises(ValueError, match="15 labels"):
        paired_delta(probs, other, y[:15], 2, **kw)
    with pytest.raises(ValueError, match="groups has 3 case ids for 16 rows"):
        paired_delta(probs, other, y, 2, **{**kw, "groups": ["a", "b", "c"]})


# --- evaluate(): predictions files in, metrics.json and report.md out ---------------------------


def _write_predictions(path: Path, probs: np.ndarray, y: np.ndarray, order: list[int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "label", "fold", "prob_normal", "prob_tumour"])
        for i in order:
            # fold by patient (2 slides each), both classes in each fold
            w.writerow(
                [f"s{i:02d}", int(y[i]), (i // 2) % 2, float(probs[i, 0]), float(probs[i, 1])]
            )
    return path


def _rows(tmp: Path, teacher_order: list[int], student_order: list[int]) -> dict[str, Path]:
    teacher, y = _noisy(16, seed=3)
    student, _ = _noisy(16, seed=4)
    return {
        "teacher": _write_predictions(tmp / "teacher.csv", teacher, y, teacher_order),
        "student.vfd.retrain": _write_predictions(tmp / "student.csv", student, y, student_order),
    }


CASES = {f"s{i:02d}": f"patient{i // 2}" for i in range(16)}  # 2 slides a patient


def test_evaluate_aligns_rows_by_slide_id(tmp_path):
    params = params_from_dict(tiny_params_dict())
    in_order = list(range(16))
    shuffled = [int(i) for i in np.random.default_rng(0).permutation(16)]
    same = evaluate(_rows(tmp_path / "a", in_order, in_order), tmp_path / "ea", params, cases=CASES)
    mixed = evaluate(
        _rows(tmp_path / "b", shuffled, in_order[::-1]), tmp_path / "eb", params, cases=CASES
    )
    assert mixed == same
    assert json.loads((tmp_path / "eb" / "metrics.json").read_text()) == json.loads(
        (tmp_path / "ea" / "metrics.json").read_text()
    )
    student = same["student.vfd.retrain"]
    assert student["n"] == 16 and student["n_cases"] == 8 and student["bootstrap"] == 50
    assert "delta_auc" not in same["teacher"]
    assert student["delta_auc"] == pytest.approx(student["auc"] - same["teacher"]["auc"], abs=2e-6)
    flat = flat_metrics(same)
    for key in ("delta_auc", "delta_auc_ci_low", "delta_f1_ci_high", "n_cases"):
        assert f"student.vfd.retrain.{key}" in flat
    assert "teacher.bootstrap_dropped" in flat


def test_evaluate_report_says_what_the_intervals_estimate(tmp_path):
    params = params_from_dict(tiny_params_dict())
    rows = _rows(tmp_path, list(range(16)), list(range(16)))
    evaluate(rows, tmp_path / "cases", params, cases=CASES)
    report = (tmp_path / "cases" / "report.md").read_text()
    assert "95% percentile intervals from 50 resamples of patients (case_id)" in report
    assert "16 slides of 8 patients" in report and "with a single class dropped" in report
    assert "## Student minus teacher (paired, case-level bootstrap)" in report
    assert "| student.vfd.retrain | " in report.split("Student minus teacher")[1]
    assert "never sees a label" in report and "test folds" in report

    evaluate(rows, tmp_path / "slides", params)
    report = (tmp_path / "slides" / "report.md").read_text()
    assert "resamples of slides" in report and "resamples of patients" not in report


def test_evaluate_errors_name_the_problem(tmp_path):
    params = params_from_dict(tiny_params_dict())
    rows = _rows(tmp_path, list(range(16)), list(range(15)))
    with pytest.raises(ValueError, match="tested on different slides"):
        evaluate(rows, tmp_path / "e", params)
    rows = _rows(tmp_path, list(range(16)), list(range(16)))
    with pytest.raises(ValueError, match=r"no case_id for tested slide\(s\) \['s15'\]"):
        evaluate(rows, tmp_path / "e", params, cases={k: v for k, v in CASES.items() if k != "s15"})
