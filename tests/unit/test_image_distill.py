"""Distillation on whole images (efcm.training.image_distill): VFD and FPD on the fundus demo and
the teacher's image features; MCM-KD refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from efcm.config import ConfigError, params_from_dict
from efcm.image_features import read_image_features
from efcm.io.image_manifest import read_image_manifest
from efcm.models.students import load_student
from efcm.stages import distill_images, extract_images
from tests.conftest import tiny_image_params_dict


def _params(method: str):
    data = tiny_image_params_dict()
    data["distill"] = {**data["distill"], "method": method}
    return params_from_dict(data)


@pytest.fixture(scope="module")
def teacher_features(fundus_demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("image_teacher")
    extract_images(fundus_demo, out, _params("vfd"))
    return out


@pytest.mark.parametrize("method", ["vfd", "fpd"])
def test_distillation_on_images_brings_the_student_closer_to_the_teacher(
    method, fundus_demo, teacher_features, tmp_path
):
    params = _params(method)
    metrics = distill_images(fundus_demo, tmp_path, params, teacher_features=teacher_features)
    before, after = metrics["val_before"], metrics["val_after"]
    history = metrics["history"]
    assert len(history) == 4
    assert after["val_cosine"] > before["cosine"]
    assert after["val_centered_cosine"] > before["centered_cosine"] + 0.3
    assert history[-1]["val_centered_cosine"] > history[0]["val_centered_cosine"] + 0.2
    # patients, not images, are held out: 8 cases, a third of them for validation
    cases = {e.case_id for e in read_image_manifest(fundus_demo).images}
    assert set(metrics["train_cases"]) | set(metrics["val_cases"]) == cases
    assert not set(metrics["train_cases"]) & set(metrics["val_cases"])
    assert len(metrics["val_cases"]) == 3 and before["n"] == 6
    assert metrics["items_per_epoch"] == 10 and metrics["pixels"] == "images"
    assert metrics["method"] == method and metrics["teacher_dim"] == 192
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    student, spec = load_student(tmp_path / "student.pt")
    assert student.out_dim == 192 and spec.resize == spec.input_size == 64


def test_a_rerun_resumes_and_the_student_extracts_image_features(
    fundus_demo, teacher_features, tmp_path
):
    params = _params("vfd")
    first = distill_images(fundus_demo, tmp_path / "d", params, teacher_features=teacher_features)
    again = distill_images(fundus_demo, tmp_path / "d", params, teacher_features=teacher_features)
    assert again["history"] == first["history"]
    assert again["resumed"] == [{"epoch": 5, "step": 0, "world": 1}]
    rows = extract_images(
        fundus_demo, tmp_path / "s", params, encoder="student", student=tmp_path / "d"
    )
    student = read_image_features(tmp_path / "s")
    assert len(rows) == 16 and student.features.shape == (16, 192)
    assert student.image_ids == read_image_features(teacher_features).image_ids
    assert student.settings["encoder"] == "student" and student.settings["arch"] == "test_resnet"


def test_mcm_is_refused_on_images_with_the_reason(fundus_demo, teacher_features, tmp_path):
    with pytest.raises(ConfigError, match=r"'mcm'.*single image has no such spatial context"):
        distill_images(fundus_demo, tmp_path, _params("mcm"), teacher_features=teacher_features)
    assert not (tmp_path / "metrics.json").exists()


def test_the_cli_refuses_mcm_and_patches_for_images(fundus_demo, teacher_features, tmp_path):
    import yaml

    from efcm.cli import EXIT_USAGE, main

    data = tiny_image_params_dict()
    data["distill"]["method"] = "mcm"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    argv = ["distill", "--kind", "image", "--params", str(tmp_path / "params.yaml")]
    argv += ["--manifest", str(fundus_demo), "--teacher-features", str(teacher_features)]
    assert main([*argv, "--out", str(tmp_path / "o")]) == EXIT_USAGE
    assert main([*argv, "--out", str(tmp_path / "o"), "--patches", "p"]) == EXIT_USAGE


def test_images_without_teacher_features_name_the_command(fundus_demo, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="extract --kind image"):
        distill_images(
            fundus_demo, tmp_path / "o", _params("vfd"), teacher_features=tmp_path / "empty"
        )
