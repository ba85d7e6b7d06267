"""The image package (`efcm export --kind image`, `efcm.training.image_export`) of the tiny
multi-label chest X-ray run (`cxr_run`): what ships is what was evaluated, member by member; its
preprocessing, thresholds and runtimes as model.json records them; `efcm predict` on a PNG and a
DICOM; and the refusals that keep a package honest."""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from efcm.cli import main
from efcm.errors import InvalidImage, InvalidInput, InvalidTensor, PackageError
from efcm.images.reader import ImageReader
from efcm.inference import image_params, predict_image, predict_patches
from efcm.io.image_manifest import LabelSpace, read_image_manifest
from efcm.models.package import load_package
from efcm.runtimes import load_runtime
from efcm.runtimes.torch_runtime import TorchRuntime
from tests.image_run import export_argv

pytestmark = pytest.mark.integration

CLASSES = ["effusion", "nodule", "cardiomegaly"]


def _predictions(path: Path) -> dict[str, tuple[int, list[float]]]:
    with path.open(newline="") as f:
        return {
            r["image_id"]: (int(r["fold"]), [float(r[f"prob_{c}"]) for c in CLASSES])
            for r in csv.DictReader(f)
        }


def _member_matches_the_evaluation(run: Path, package: Path, strategy: str) -> int:
    """Each member k of `package`, alone and in FP32, predicts fold k's test images of
    strategies/<strategy>/predictions.csv exactly; returns how many images were compared."""
    pkg = load_package(package)
    params = image_params(load_runtime(package, "onnx"))
    manifest = read_image_manifest(run / "data/manifest.csv", LabelSpace.of(params))
    reader = ImageReader(params, manifest.base_dir)
    by_id = {e.image_id: e for e in manifest.images}
    oof = _predictions(run / "strategies" / strategy / "predictions.csv")
    assert pkg.n_members == 2
    for k in range(pkg.n_members):
        member = TorchRuntime(pkg.member(k), device="cpu", cpu_bf16=False)
        for image_id, (fold, probs) in oof.items():
            if fold == k:
                got = predict_image(member, reader(by_id[image_id])).probabilities
                np.testing.assert_allclose(got, probs, atol=2e-5, err_msg=image_id)
    return len(oof)


def test_each_member_reproduces_the_out_of_fold_predictions(cxr_run):
    meta = json.loads((cxr_run / "package/model.json").read_text())
    assert meta["kind"] == "image" and meta["strategy"] == "retrain"
    assert meta["ensemble"]["heads"] == ["head_fold_0.pt", "head_fold_1.pt"]
    assert meta["ensemble"]["students"] == ["student.pt"]
    assert _member_matches_the_evaluation(cxr_run, cxr_run / "package", "retrain") == 22


def test_a_finetune_package_ships_each_folds_student(cxr_run, tmp_path):
    raw = yaml.safe_load((cxr_run / "params.yaml").read_text())
    raw["image"]["export_strategy"] = "finetune"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    out = tmp_path / "package"
    with contextlib.chdir(cxr_run):
        assert main([*export_argv(str(out)), "--params", str(params)]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["ensemble"]["students"] == ["student_fold_0.pt", "student_fold_1.pt"]
    assert meta["ensemble"]["per_fold_student"] and meta["feature_dim"] == 2 * (
        load_package(out).member(0).feature_dim
    )
    assert _member_matches_the_evaluation(cxr_run, out, "finetune") == 22


def test_model_json_records_preprocessing_thresholds_and_runtime_parity(cxr_run):
    meta = json.loads((cxr_run / "package/model.json").read_text())
    metrics = json.loads((cxr_run / "evaluate/metrics.json").read_text())
    row = metrics[meta["row"]]
    assert meta["image"] == {
        "size": 64, "resize": "pad", "crop": "none", "fov_threshold": 20, "channels": "grey"
    }  # fmt: skip
    assert meta["multi_label"] and meta["classes"] == CLASSES
    thr = meta["thresholds"]
    assert thr["per_fold"] == [row["thresholds"][k]["thresholds"] for k in ("0", "1")]
    np.testing.assert_allclose(thr["per_class"], np.mean(thr["per_fold"], 0), atol=1e-6)
    for name in ("onnx", "int8"):
        parity = meta["runtimes"][name]["parity"]
        assert parity["unit"] == "images" and parity["images"] == parity["patches"] == 22
        assert parity["feature_cosine_min"] >= (0.999 if name == "onnx" else 0.99)
    int8 = meta["runtimes"]["int8"]
    splits = json.loads((cxr_run / "splits.json").read_text())
    train = {s for fold in splits["folds"] for s in fold["train"]}
    assert int8["head"] == "head.onnx"
    assert int8["quantization"]["calibration"]["patches"] == len(train) < 22
    assert "training images" in int8["quantization"]["calibration"]["from"]
    decided = int8["parity"]["same_label_decided"].split("/")
    assert decided[0] == decided[1]  # the rule export applied (every decided call the same)


def test_the_multi_label_call_uses_the_recorded_thresholds(cxr_run):
    rt = load_runtime(cxr_run / "package", "onnx")
    thr = rt.meta["thresholds"]["per_class"]
    probs = np.array([thr[0], thr[1] - 1e-3, thr[2] + 0.2], np.float32)
    assert rt.label_of(probs) == ["effusion", "cardiomegaly"]  # >= its threshold is called
    assert rt.label_of(np.zeros(3, np.float32)) == []
    member = load_package(cxr_run / "package").member(1)
    assert member.meta["thresholds"]["per_class"] == rt.meta["thresholds"]["per_fold"][1]


@pytest.mark.parametrize("runtime", ["torch", "onnx", "int8"])
def test_predict_cli_answers_a_png_and_a_dicom(cxr_run, runtime, capsys):
    images = cxr_run / "data/images"
    png = next(images.glob("*.png"))
    dcm = next(images.glob("*.dcm"))
    rt = load_runtime(cxr_run / "package", runtime)
    for f in (png, dcm):
        assert main(["predict", str(cxr_run / "package"), str(f), "--runtime", runtime]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["classes"] == CLASSES and out["multi_label"] and out["runtime"] == runtime
        expected = predict_image(rt, f.read_bytes(), name=f.name)
        np.testing.assert_allclose(out["probabilities"], expected.probabilities, atol=1e-6)
        assert out["label"] == expected.label and isinstance(out["label"], list)


def test_pixels_and_the_encoded_file_give_the_same_answer(cxr_run):
    """A client that sends the decoded 8-bit pixels (grey, or grey as RGB) gets the answer of the
    file (the demo's PNGs are 16-bit: decoding stretches them to 8 bits first)."""
    from efcm.images.decode import decode_image

    rt = load_runtime(cxr_run / "package", "onnx")
    png = next((cxr_run / "data/images").glob("*.png"))
    grey = decode_image(png.read_bytes(), png.name, max_pixels=10**8, min_side=16)
    assert grey.ndim == 2 and grey.dtype == np.uint8
    from_file = predict_image(rt, png.read_bytes()).probabilities
    np.testing.assert_allclose(predict_image(rt, grey).probabilities, from_file, atol=1e-6)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    np.testing.assert_allclose(predict_image(rt, rgb).probabilities, from_file, atol=1e-6)


def test_bad_images_and_inputs_of_the_other_kind_are_refused(cxr_run, capsys):
    rt = load_runtime(cxr_run / "package", "onnx")
    with pytest.raises(InvalidImage, match=r"upload\.png: not an image"):
        predict_image(rt, b"GIF89a not a png", name="upload.png")
    with pytest.raises(InvalidTensor, match=r"UINT8 \[H, W, 3\]"):
        predict_image(rt, np.zeros((32, 32, 4), np.uint8))
    with pytest.raises(InvalidTensor, match="must be UINT8"):
        predict_image(rt, np.zeros((32, 32), np.float32))
    with pytest.raises(InvalidImage, match="under the smallest side"):
        predict_image(rt, np.zeros((8, 64), np.uint8))
    with pytest.raises(InvalidInput, match="patches is for a slide package; this is an image"):
        predict_patches(rt, np.zeros((1, 64, 64, 3), np.uint8))
    assert main(["predict", str(cxr_run / "package"), str(cxr_run / "params.yaml")]) == 1
    assert "params.yaml: not an image" in capsys.readouterr().err


def test_slide_packages_refuse_an_image(tmp_path):
    from efcm.config import params_from_dict
    from tests import packages
    from tests.conftest import tiny_params_dict

    pkg = packages.build_package(tmp_path / "pkg", params_from_dict(tiny_params_dict()), 8)
    rt = load_runtime(pkg, "torch")
    with pytest.raises(InvalidInput, match="an image is for an image package; this is a slide"):
        predict_image(rt, b"\x89PNG")


def test_export_refuses_preprocessing_other_than_the_heads_were_trained_on(
    cxr_run, tmp_path, capsys
):
    raw = yaml.safe_load((cxr_run / "params.yaml").read_text())
    raw["image"]["size"] = 96
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    out = tmp_path / "package"
    with contextlib.chdir(cxr_run):
        assert main([*export_argv(str(out)), "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "image section differs from the preprocessing the heads were trained on" in err
    assert "size 64 -> 96" in err and not out.exists()


def test_a_package_whose_preprocessing_was_edited_is_refused(cxr_run, tmp_path):
    bad = tmp_path / "package"
    shutil.copytree(cxr_run / "package", bad)
    meta = json.loads((bad / "model.json").read_text())
    meta["image"]["crop"] = "fundus"
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=r"image geometry differs from its params \(crop"):
        load_runtime(bad, "onnx")


def test_export_refuses_an_unevaluated_strategy(cxr_run, tmp_path):
    metrics = json.loads((cxr_run / "evaluate/metrics.json").read_text())
    del metrics["student.vfd.retrain"]
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    argv = export_argv(str(tmp_path / "package"))
    argv[argv.index("evaluate/metrics.json")] = str(path)
    with contextlib.chdir(cxr_run):
        assert main(argv) == 1
    assert not (tmp_path / "package").exists()
