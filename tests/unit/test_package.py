"""What ships is what was evaluated: the package is the exported strategy's k fold models, each
reproducing the evaluation's out-of-fold predictions, with the geometry they were trained on."""

import json
import shutil

import numpy as np
import pytest

from efcm import stages
from efcm.config import for_stage, params_from_dict
from efcm.errors import PackageError
from efcm.features import read_features
from efcm.inference import predict_features, predict_slide
from efcm.io.manifest import read_manifest
from efcm.io.results import read_predictions
from efcm.models.package import load_package
from efcm.runtimes.torch_runtime import TorchRuntime
from efcm.slides.patching import read_patch_settings
from tests.conftest import tiny_params_dict

pytestmark = pytest.mark.slow
CLASSES = ("normal", "tumour")


def _oof(mil_dir):
    """{slide_id: (fold, probs)} of a strategy's out-of-fold predictions."""
    import csv

    with open(mil_dir / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {
        r["slide_id"]: (int(r["fold"]), np.array([float(r[f"prob_{c}"]) for c in CLASSES]))
        for r in rows
    }


def test_model_json_names_the_evaluated_row_and_what_its_metrics_estimate(demo_run):
    meta = json.loads((demo_run["package"] / "model.json").read_text())
    metrics = json.loads((demo_run["evaluate"] / "metrics.json").read_text())
    assert meta["strategy"] == "retrain" and meta["row"] == "student.vfd.retrain"
    assert meta["metrics"][meta["row"]] == metrics[meta["row"]]
    assert "delta_auc_ci_low" in meta["metrics"][meta["row"]]
    ens = meta["ensemble"]
    splits = json.loads(demo_run["splits"].read_text())
    assert ens["members"] == len(splits["folds"]) == len(ens["clams"])
    assert ens["students"] == ["student.pt"] and ens["student_passes_per_patch"] == 1
    assert "out-of-fold" in meta["estimate"] and "one fold model" in meta["estimate"]


def test_each_member_reproduces_the_evaluated_out_of_fold_predictions(demo_run, tiny_dataset):
    pkg = load_package(demo_run["package"])
    oof = _oof(demo_run["strategies"][1])  # retrain, the exported strategy
    manifest = read_manifest(tiny_dataset, CLASSES)
    by_id = {s.slide_id: s for s in manifest.slides}
    assert len(oof) == len(manifest.slides)

    def fp32(p):  # the torch runtime in the evaluation's arithmetic (no CPU bf16 autocast)
        return TorchRuntime(p, cpu_bf16=False)

    for sid, (fold, probs) in oof.items():
        feats, _ = read_features(demo_run["extract_student"] / "features" / f"{sid}.h5")
        np.testing.assert_allclose(
            predict_features(fp32(pkg.member(fold)), feats).probabilities, probs, atol=1e-5
        )
        # the whole path a served slide takes: patching with the packaged geometry, the student
        uri = manifest.base_dir / by_id[sid].uri
        served = predict_slide(fp32(pkg.member(fold)), uri, read_workers=0)
        np.testing.assert_allclose(served.probabilities, probs, atol=1e-4)
        # the package answers with the mean of its members
        members = [
            predict_features(fp32(pkg.member(k)), feats).probabilities for k in range(pkg.n_members)
        ]
        np.testing.assert_allclose(
            predict_features(fp32(pkg), feats).probabilities, np.mean(members, 0), atol=1e-6
        )


def test_the_package_records_the_geometry_of_the_training_coords(demo_run):
    meta = json.loads((demo_run["package"] / "model.json").read_text())
    some = next((demo_run["patch"] / "patches").glob("*.h5"))
    recorded = read_patch_settings(some)
    for key in ("target_mpp", "patch_size", "step", "tissue", "contour_fn"):
        assert meta["patch"][key] == recorded[key]


def test_a_package_whose_geometry_disagrees_with_its_params_is_refused(demo_run, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(demo_run["package"], pkg)
    meta = json.loads((pkg / "model.json").read_text())
    meta["patch"]["patch_size"] = 2 * meta["patch"]["patch_size"]
    (pkg / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=r"patch geometry differs from its params.*patch_size"):
        load_package(pkg)


def test_export_refuses_params_whose_patching_differs_from_the_training_coords(
    demo_run, tiny_dataset, tmp_path
):
    raw = tiny_params_dict()
    raw["mil"] = {**raw["mil"], "strategies": ["reuse", "retrain"]}
    raw["patch"] = {**raw["patch"], "step": raw["patch"]["step"] // 2}
    params = for_stage(params_from_dict(raw), "export")
    with pytest.raises(PackageError, match=r"differs from the patching the CLAMs were trained on"):
        stages.export(
            demo_run["distill"],
            demo_run["strategies"],
            tmp_path / "pkg",
            params,
            metrics_path=demo_run["evaluate"] / "metrics.json",
            patches_dir=demo_run["patch"],
            manifest=tiny_dataset,
        )
    assert not (tmp_path / "pkg").exists()


def test_export_refuses_a_strategy_the_evaluation_did_not_score(demo_run, tiny_dataset, tmp_path):
    raw = tiny_params_dict()
    raw["mil"] = {**raw["mil"], "strategies": ["reuse", "retrain"]}
    metrics = json.loads((demo_run["evaluate"] / "metrics.json").read_text())
    del metrics["student.vfd.retrain"]
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(PackageError, match=r"no row 'student.vfd.retrain'"):
        stages.export(
            demo_run["distill"],
            demo_run["strategies"],
            tmp_path / "pkg",
            for_stage(params_from_dict(raw), "export"),
            metrics_path=tmp_path / "metrics.json",
            patches_dir=demo_run["patch"],
            manifest=tiny_dataset,
        )


def test_the_evaluated_rows_are_the_planned_strategies(demo_run):
    done = json.loads((demo_run["evaluate"] / "strategies.json").read_text())
    assert done["run"] == ["reuse", "retrain"] and "etc" in done["left_out"]
    _, _, ids = read_predictions(demo_run["strategies"][0] / "predictions.csv", CLASSES)
    assert len(ids) == 6
