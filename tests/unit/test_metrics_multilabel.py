"""Multi-label metrics (image tasks): per-class and macro AUROC, F1 at thresholds picked on the
validation rows of each fold, classes with one label value, and the paired patient-level bootstrap,
all against values computed by hand."""

import numpy as np
import pytest

from efcm.evaluation.metrics import (
    FALLBACK_THRESHOLD,
    case_resamples,
    multilabel_scores,
    paired,
    pick_thresholds,
    scored_classes,
    summarise,
    threshold_by_fold,
)

CLASSES = ("a", "b", "c")
# six test images; class c is absent from every one (one label value: no AUROC)
TARGETS = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0]])
PROBS = np.array(
    [[0.9, 0.2, 0.1], [0.3, 0.8, 0.2], [0.6, 0.4, 0.3], [0.2, 0.1, 0.4], [0.7, 0.6, 0.2],
     [0.4, 0.3, 0.1]]
)  # fmt: skip


def test_per_class_and_macro_auroc_and_mean_f1_by_hand():
    called = (PROBS >= 0.5).astype(int)
    point = multilabel_scores(PROBS, TARGETS, called, CLASSES, n_bootstrap=0).point
    # a: positives .9 .6 .4 against negatives .3 .2 .7 -> 3 + 2 + 2 of 9 pairs ordered
    assert point["auc_a"] == pytest.approx(7 / 9)
    assert point["auc_b"] == pytest.approx(1.0)  # .8 .4 .6 all above .2 .1 .3
    assert np.isnan(point["auc_c"]) and np.isnan(point["f1_c"])  # no positive: left out
    assert point["auc"] == pytest.approx((7 / 9 + 1) / 2)  # macro over the scored classes
    # a at 0.5: calls rows 0, 2, 4 -> tp 2, fp 1, fn 1; b: rows 1, 4 -> tp 2, fp 0, fn 1
    assert point["f1_a"] == pytest.approx(2 / 3)
    assert point["f1_b"] == pytest.approx(4 / 5)
    assert point["f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert scored_classes(TARGETS).tolist() == [True, True, False]


def test_pick_thresholds_max_f1_ties_to_the_highest_and_one_value_falls_back():
    probs = np.array([[0.9, 0.8, 0.1], [0.7, 0.6, 0.2], [0.6, 0.4, 0.3], [0.4, 0.2, 0.4],
                      [0.3, 0.2, 0.5]])  # fmt: skip
    targets = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    thr, fell_back = pick_thresholds(probs, targets)
    # a: F1 at .9 .7 .6 .4 .3 = 2/4, 2/5, 4/6, 6/7, 6/8 -> .4
    assert thr[0] == pytest.approx(0.4)
    # b: at .8 2/4; .6 2/5; .4 2/6; .2 (rows 3 and 4, tied) 6/8 -> .2
    assert thr[1] == pytest.approx(0.2)
    # c: no positive in these rows: no threshold can be picked, the fallback is used
    assert thr[2] == FALLBACK_THRESHOLD and fell_back.tolist() == [False, False, True]
    # equal F1 at .8 (2/3) and .2 (2/3): the highest threshold wins
    tie, _ = pick_thresholds(np.array([[0.8], [0.6], [0.4], [0.2]]), np.array([[1], [0], [0], [1]]))
    assert tie[0] == pytest.approx(0.8)
    # only positives: also the fallback
    _, only_pos = pick_thresholds(np.array([[0.3], [0.9]]), np.array([[1], [1]]))
    assert only_pos.tolist() == [True]


def test_thresholds_come_from_each_folds_validation_rows_never_its_test_rows():
    test_p = np.array([[0.5], [0.5], [0.35], [0.35]])
    folds = np.array([0, 0, 1, 1])
    val_p = np.array([[0.6], [0.2], [0.3], [0.1]])
    val_t = np.array([[1], [0], [1], [0]])
    val_f = np.array([0, 0, 1, 1])
    called, picked = threshold_by_fold(test_p, folds, val_p, val_t, val_f)
    assert picked[0]["thresholds"] == [0.6] and picked[1]["thresholds"] == [0.3]
    # 0.5 is below fold 0's threshold, 0.35 above fold 1's: the same fold's threshold is applied
    assert called[:, 0].tolist() == [0, 0, 1, 1]
    # fold 1's validation rows hold one value: fallback 0.5, recorded
    _, fell = threshold_by_fold(test_p, folds, val_p, np.array([[1], [0], [0], [0]]), val_f)
    assert fell[1] == {"thresholds": [FALLBACK_THRESHOLD], "fallback": [0]}


def test_resamples_lacking_a_scored_class_value_are_dropped_for_every_metric():
    groups = ["p1", "p1", "p2", "p3", "p4", "p5"]
    called = (PROBS >= 0.5).astype(int)
    s = multilabel_scores(PROBS, TARGETS, called, CLASSES, groups=groups, n_bootstrap=200, seed=1)
    kept = 0
    for idx in case_resamples(groups, 200, seed=1):
        t = TARGETS[idx][:, :2]
        kept += bool(((t.max(0) > 0) & (t.min(0) == 0)).all())
    assert s.dropped == 200 - kept and len(s.samples) == kept
    assert s.n_cases == 5 and s.n == 6
    out = summarise(s, 0.95)
    assert out["auc_ci_low"] <= out["auc"] <= out["auc_ci_high"]
    assert np.isnan(out["auc_c_ci_low"])  # the unscored class has no interval


def test_paired_delta_uses_the_same_resamples_for_both_models():
    rng = np.random.default_rng(0)
    n = 40
    groups = [f"p{i // 2}" for i in range(n)]  # two images per patient
    targets = (rng.random((n, 2)) < 0.4).astype(int)
    teacher = np.clip(0.3 + 0.4 * targets + rng.normal(0, 0.2, (n, 2)), 0, 1)
    student = np.clip(teacher + rng.normal(0, 0.05, (n, 2)), 0, 1)
    kw = {"groups": groups, "n_bootstrap": 300, "seed": 7}
    s = multilabel_scores(student, targets, (student >= 0.5).astype(int), ("x", "y"), **kw)
    t = multilabel_scores(teacher, targets, (teacher >= 0.5).astype(int), ("x", "y"), **kw)
    d = paired(s, t, 0.95)
    j = s.metrics.index("auc")
    diff = s.samples[:, j] - t.samples[:, j]
    assert d["delta_auc_ci_low"] == pytest.approx(np.quantile(diff, 0.025))
    # a near-copy of the teacher: the paired interval is far narrower than the difference of two
    # unpaired draws (the same student scored on other resamples)
    other = multilabel_scores(student, targets, (student >= 0.5).astype(int), ("x", "y"),
                              groups=groups, n_bootstrap=300, seed=8)  # fmt: skip
    unpaired = other.samples[: len(t.samples), j] - t.samples[: len(other.samples), j]
    paired_width = d["delta_auc_ci_high"] - d["delta_auc_ci_low"]
    assert paired_width < 0.5 * (np.quantile(unpaired, 0.975) - np.quantile(unpaired, 0.025))
    with pytest.raises(ValueError, match="same resamples"):
        paired(other, t, 0.95)
    assert {"delta_auc", "delta_f1", "delta_auc_x", "delta_auc_y"} <= set(d)


def test_multilabel_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        multilabel_scores(PROBS[:, :2], TARGETS, TARGETS, CLASSES, n_bootstrap=0)
