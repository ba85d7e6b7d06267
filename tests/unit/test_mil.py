"""CLAM, patient-level splits, metrics, export and the package loader."""

import json

import numpy as np
import pytest
import torch

from efcm.config import TrainMilParams
from efcm.evaluation.metrics import classification_metrics, roc_points
from efcm.io.manifest import Manifest, SlideEntry
from efcm.models.clam import CLAMSB
from efcm.training.mil import FeatureBags, make_splits, train_fold


def test_attention_sums_to_one_and_shapes():
    torch.manual_seed(0)
    for c in (2, 3):
        m = CLAMSB(16, c, hidden=8, attn_dim=4).eval()
        out = m(torch.randn(37, 16))
        assert out["logits"].shape == (1, c) and out["attention"].shape == (37,)
        assert torch.isclose(out["attention"].sum(), torch.tensor(1.0))
        assert torch.isclose(out["probs"].sum(), torch.tensor(1.0))


def test_instance_loss_uses_min_b_and_n():
    m = CLAMSB(4, 2, hidden=8, attn_dim=4, k_sample=8)
    assert m(torch.randn(6, 4), label=1)["instance_loss"] > 0  # B shrinks to 3
    assert m(torch.randn(1, 4), label=1)["instance_loss"] == 0


def test_bad_bags_are_errors_naming_the_shape():
    m = CLAMSB(16, 2)
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        m(torch.randn(5, 15))
    with pytest.raises(ValueError, match="empty bag"):
        m(torch.zeros(0, 16))


def _write_bags(root, sizes, dim=8, seed=0):
    from efcm.features import write_features

    rng = np.random.default_rng(seed)
    bags = {}
    for i, n in enumerate(sizes):
        feats = rng.standard_normal((n, dim)).astype(np.float32)
        coords = np.arange(2 * n, dtype=np.int64).reshape(n, 2)
        write_features(root / "features" / f"s{i}.h5", feats, coords, {"slide_id": f"s{i}"})
        bags[f"s{i}"] = (feats, coords)
    return bags


def test_feature_bags_read_on_access_and_keep_a_bounded_lru(tmp_path):
    written = _write_bags(tmp_path, [100, 100, 100, 100])
    per_bag = 100 * 8 * 4 + 100 * 2 * 8  # features + coords bytes
    bags = FeatureBags(tmp_path, sorted(written), cache_bytes=2 * per_bag)
    assert len(bags) == 4 and list(bags) == sorted(written) and bags.dim == 8
    assert bags.resident == []  # construction reads headers only
    for sid, (feats, coords) in written.items():
        assert torch.equal(bags[sid], torch.from_numpy(feats))
        np.testing.assert_array_equal(bags.coords(sid), coords)
        assert len(bags.resident) <= 2 and bags.resident[-1] == sid
    assert bags.resident == ["s2", "s3"]
    bags["s2"]  # a hit moves it to the end
    assert bags.resident == ["s3", "s2"]
    # an evicted bag is read from its file again
    _write_bags(tmp_path, [100], seed=1)
    assert not torch.equal(bags["s0"], torch.from_numpy(written["s0"][0]))
    assert "s0" in bags and "x" not in bags
    with pytest.raises(KeyError):
        bags["x"]
    # a budget smaller than one bag still holds the last one read
    tiny = FeatureBags(tmp_path, ["s0", "s1"], cache_bytes=1)
    tiny["s0"], tiny["s1"]
    assert tiny.resident == ["s1"]


def test_feature_bags_refuse_a_missing_file_or_an_empty_bag(tmp_path):
    _write_bags(tmp_path, [3, 0])
    with pytest.raises(FileNotFoundError, match="s9: no features file"):
        FeatureBags(tmp_path, ["s0", "s9"])
    with pytest.raises(ValueError, match="s1: empty bag"):
        FeatureBags(tmp_path, ["s0", "s1"])


def _manifest(n_cases=9, per_case=2):
    slides = []
    for c in range(n_cases):
        for k in range(per_case):
            slides.append(
                SlideEntry(f"s{c}_{k}", f"case{c}", "x", "tumour" if c % 3 == 0 else "normal")
            )
    return Manifest(None, tuple(slides))


def test_splits_keep_patients_together_and_classes_in_every_fold():
    m = _manifest()
    case = {s.slide_id: s.case_id for s in m.slides}
    label = {s.slide_id: s.label for s in m.slides}
    splits = make_splits(m, ("normal", "tumour"), 3, 0.25, seed=1)
    tested = []
    for f in splits["folds"]:
        parts = [{case[s] for s in f[k]} for k in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert {label[s] for s in f["test"]} == {"normal", "tumour"}
        assert {label[s] for s in f["train"]} == {"normal", "tumour"}
        tested += f["test"]
    assert sorted(tested) == sorted(case)  # every slide tested exactly once
    assert splits == make_splits(m, ("normal", "tumour"), 3, 0.25, seed=1)


def test_splits_refuse_too_few_cases():
    with pytest.raises(ValueError, match=r"has 2 case\(s\); 3 folds need at least 3"):
        make_splits(_manifest(n_cases=4), ("normal", "tumour"), 3, 0.25, seed=0)


def test_clam_learns_a_class_dependent_shift():
    rng = np.random.default_rng(0)
    bags, labels = {}, {}
    for i in range(24):
        y = i % 2
        x = rng.normal(0, 1, (40, 16)).astype(np.float32)
        if y:
            x[:8] += 2.0  # a few "tumour" instances
        bags[f"b{i}"], labels[f"b{i}"] = torch.from_numpy(x), y
    ids = sorted(bags)
    cfg = TrainMilParams(epochs=15, min_epochs=15, lr=1e-3, hidden=16, attn_dim=8)
    model, info = train_fold(bags, labels, ids[:16], ids[16:20], 2, cfg, seed=0)
    with torch.no_grad():
        probs = np.stack([model(bags[s])["probs"][0].numpy() for s in ids[20:] + ids[16:20]])
    y = np.array([labels[s] for s in ids[20:] + ids[16:20]])
    assert classification_metrics(probs, y, 2, n_bootstrap=0)["auc"] > 0.9
    assert info["best_epoch"] >= 1


def test_metrics_and_bootstrap_ci():
    y = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    perfect = np.stack([1 - y, y], 1).astype(np.float32)
    m = classification_metrics(perfect, y, 2, n_bootstrap=100, seed=0)
    assert m["auc"] == 1 and m["acc"] == 1 and m["f1"] == 1
    noisy = np.clip(perfect + np.random.default_rng(0).normal(0, 0.4, perfect.shape), 0, 1)
    m = classification_metrics(noisy, y, 2, n_bootstrap=200, seed=0)
    for k in ("acc", "auc", "f1", "balanced_acc"):
        assert m[f"{k}_ci_low"] <= m[k] <= m[f"{k}_ci_high"]
    roc = roc_points(noisy, y)
    assert roc[0]["fpr"] == 0 and roc[-1]["tpr"] == 1


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        classification_metrics(np.zeros((3, 3)), np.zeros(3), 2)


def test_package_round_trip_and_tamper_detection(demo_run, tmp_path):
    """The package the demo stages export loads, carries the evaluation's metrics of its row,
    predicts on bags of its width only, and is refused once a file is altered."""
    import shutil

    from efcm.errors import PackageError
    from efcm.features import read_features
    from efcm.inference import predict_features
    from efcm.models.package import load_package
    from efcm.runtimes import load_runtime

    pkg_dir = tmp_path / "pkg"
    shutil.copytree(demo_run["package"], pkg_dir)  # the session's package stays intact
    pkg = load_runtime(pkg_dir, "torch")
    feats, _ = read_features(next((demo_run["extract_student"] / "features").glob("*.h5")))
    dim = feats.shape[1]
    assert pkg.classes == ["normal", "tumour"] and pkg.feature_dim == dim
    metrics = json.loads((demo_run["evaluate"] / "metrics.json").read_text())
    assert pkg.meta["metrics"]["student.vfd.retrain"] == metrics["student.vfd.retrain"]
    pred = predict_features(pkg, np.random.default_rng(0).normal(size=(7, dim)).astype(np.float32))
    assert pred.probabilities.shape == (2,) and pred.attention.shape == (7,)
    with pytest.raises(ValueError, match=rf"\[N, {dim}\]"):
        predict_features(pkg, np.zeros((7, dim - 1), np.float32))
    with open(pkg_dir / "clam_fold_0.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(PackageError, match="sha256"):
        load_package(pkg_dir)


def test_predict_slide_gives_heatmap_and_gallery_pngs(demo_package, tiny_dataset):
    import cv2

    from efcm.inference import predict_slide
    from efcm.io.manifest import read_manifest
    from efcm.runtimes import load_runtime

    pkg = load_runtime(demo_package, "torch")
    slide = read_manifest(tiny_dataset).slides[0]
    pred = predict_slide(pkg, tiny_dataset.parent / slide.uri, heatmap=True, gallery_k=4)
    assert len(pred.attention) == len(pred.coords) > 4
    for png in (pred.heatmap_png, pred.gallery_png):
        img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.ndim == 3
