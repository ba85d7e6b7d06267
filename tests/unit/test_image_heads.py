"""Image-level strategies on features: patient-level splits, the linear probe / Retrain heads on
separable synthetic features, Reuse of the teacher's heads, and the files they write."""

from pathlib import Path

import numpy as np
import pytest

from efcm.config import ConfigError, ImageHeadParams
from efcm.evaluation.metrics import multilabel_scores
from efcm.io.image_manifest import ImageEntry, ImageManifest, LabelSpace
from efcm.io.results import VAL_PREDICTIONS, read_folds, read_predictions, read_summary
from efcm.training.image_heads import image_features, image_splits, reuse_heads, train_heads

MULTI = LabelSpace(("effusion", "nodule", "cardiomegaly"), multi_label=True)
BINARY = LabelSpace(("no_lesion", "lesion"))
FAST = ImageHeadParams(epochs=80, min_epochs=5, patience=10, lr=0.05, batch_size=32)


def _cohort(space: LabelSpace, n_cases: int = 30, seed: int = 0) -> ImageManifest:
    """Two images per case whose labels may differ (two eyes, two views), two unlabelled."""
    rng = np.random.default_rng(seed)
    images = []
    for c in range(n_cases):
        for j in range(2):
            if space.multi_label:
                shown = [k for k in space.classes if rng.random() < 0.4]
                label = "|".join(shown) or space.none_label
            else:
                label = space.classes[int(rng.random() < 0.5)]
            images.append(ImageEntry(f"c{c:02d}_{j}", f"c{c:02d}", f"c{c}_{j}.png", label))
    images += [ImageEntry("u0", "cu", "u0.png", ""), ImageEntry("u1", "cu", "u1.png", "")]
    return ImageManifest(Path("images.csv"), tuple(images))


def _features(m: ImageManifest, space: LabelSpace, dim: int = 8, seed: int = 0):
    """Features with signal: each class shifts its own dimension, plus noise."""
    rng = np.random.default_rng(seed)
    labels = m.labels(space)
    ids = [e.image_id for e in m.images]
    x = rng.normal(0, 1, (len(ids), dim)).astype(np.float32)
    for i, s in enumerate(ids):
        for c in labels.get(s, ()):
            x[i, c] += 4.0
    return x, ids


def test_splits_keep_a_cases_images_together_and_leave_unlabelled_out():
    m = _cohort(MULTI)
    splits = image_splits(m, MULTI, 3, 0.25, seed=1)
    case = {e.image_id: e.case_id for e in m.images}
    assert splits["unlabelled"] == ["u0", "u1"]
    labelled = sorted(e.image_id for e in m.images if e.labelled)
    tested = sorted(s for f in splits["folds"] for s in f["test"])
    assert tested == labelled  # every labelled image tested exactly once
    for f in splits["folds"]:
        parts = {p: {case[s] for s in f[p]} for p in ("train", "val", "test")}
        assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"]
        assert not parts["val"] & parts["test"]  # no patient in two parts of a fold
        # stratified: every class is shown in every test fold
        labels = m.labels(MULTI)
        assert {c for s in f["test"] for c in labels[s]} == {0, 1, 2}
    assert splits == image_splits(m, MULTI, 3, 0.25, seed=1)


def test_splits_refuse_a_class_shown_by_too_few_cases():
    m = _cohort(BINARY, n_cases=6)
    few = [e for e in m.images if e.label != "lesion" or e.case_id in ("c00", "c01", "c02")]
    rare = ImageManifest(m.path, tuple(few))
    n = len({e.case_id for e in few if e.label == "lesion"})
    with pytest.raises(ValueError, match=f"'lesion' is shown by {n} case"):
        image_splits(rare, BINARY, n + 1, 0.25, seed=0)


def test_probe_learns_a_separable_multilabel_task_and_writes_the_slide_layout(tmp_path):
    m = _cohort(MULTI)
    x, ids = _features(m, MULTI)
    splits = image_splits(m, MULTI, 3, 0.25, seed=0)
    summary = train_heads(image_features(x, ids, m, MULTI), splits, tmp_path, FAST, seed=0)
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2]
    assert summary["multi_label"] and summary["feature_dim"] == 8
    probs, targets, tested = read_predictions(tmp_path / "predictions.csv", MULTI.classes,
                                              multi_label=True)  # fmt: skip
    assert targets.shape == (60, 3) and set(np.unique(targets)) == {0, 1}
    assert sorted(tested) == sorted(s for f in splits["folds"] for s in f["test"])
    truth = m.targets(MULTI)
    assert all(np.array_equal(targets[i], truth[s]) for i, s in enumerate(tested))
    point = multilabel_scores(probs, targets, (probs >= 0.5).astype(int), MULTI.classes,
                              n_bootstrap=0).point  # fmt: skip
    assert point["auc"] > 0.8  # chance is 0.5; about 0.9 here (30 training images a fold)
    # each fold's validation predictions, for the thresholds
    _, _, val_ids = read_predictions(tmp_path / VAL_PREDICTIONS, MULTI.classes, multi_label=True)
    val_folds = read_folds(tmp_path / VAL_PREDICTIONS)
    for k, f in enumerate(splits["folds"]):
        assert sorted(s for s, g in zip(val_ids, val_folds, strict=True) if g == k) == f["val"]
    assert all((tmp_path / f"fold_{k}.pt").is_file() for k in range(3))


def test_probe_learns_a_separable_multiclass_task(tmp_path):
    m = _cohort(BINARY)
    x, ids = _features(m, BINARY)
    splits = image_splits(m, BINARY, 3, 0.25, seed=0)
    train_heads(image_features(x, ids, m, BINARY), splits, tmp_path, FAST, seed=0)
    probs, labels, _ = read_predictions(tmp_path / "predictions.csv", BINARY.classes)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert ((probs.argmax(1) == labels).mean()) > 0.85  # chance is about 0.5


def test_reuse_applies_the_teachers_heads_and_refuses_other_spaces(tmp_path):
    m = _cohort(MULTI)
    x, ids = _features(m, MULTI)
    splits = image_splits(m, MULTI, 3, 0.25, seed=0)
    teacher_dir = tmp_path / "teacher"
    teacher = train_heads(image_features(x, ids, m, MULTI), splits, teacher_dir, FAST, seed=0)
    # a student in the teacher's space: its features are the teacher's, a little off
    noisy = x + np.random.default_rng(1).normal(0, 0.05, x.shape).astype(np.float32)
    student = image_features(noisy, ids, m, MULTI)
    out = tmp_path / "reuse"
    assert reuse_heads(teacher_dir, student, splits, out, "vfd") == teacher
    t_probs, _, t_ids = read_predictions(teacher_dir / "predictions.csv", MULTI.classes,
                                         multi_label=True)  # fmt: skip
    s_probs, _, s_ids = read_predictions(out / "predictions.csv", MULTI.classes, multi_label=True)
    assert s_ids == t_ids and np.abs(s_probs - t_probs).max() < 0.1
    assert (out / VAL_PREDICTIONS).is_file() and read_summary(out) == teacher
    with pytest.raises(ConfigError, match="MCM-KD"):
        reuse_heads(teacher_dir, student, splits, tmp_path / "x", "mcm")
    small = image_features(x[:, :4], ids, m, MULTI)
    with pytest.raises(ConfigError, match="8-d features but the student gives 4-d"):
        reuse_heads(teacher_dir, small, splits, tmp_path / "y", "fpd")


def test_heads_name_missing_features(tmp_path):
    m = _cohort(BINARY)
    x, ids = _features(m, BINARY)
    splits = image_splits(m, BINARY, 3, 0.25, seed=0)
    with pytest.raises(ValueError, match="no features for 1 image"):
        train_heads(image_features(x[1:], ids[1:], m, BINARY), splits, tmp_path, FAST, seed=0)
    with pytest.raises(ValueError, match=r"one row per image id"):
        image_features(x[1:], ids, m, BINARY)
