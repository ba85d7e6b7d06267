"""The KFP components as plain functions (`python_func`), and the manifest import they rely on."""

import ast
import csv
import inspect
from pathlib import Path

import pytest
import yaml
from kfp import dsl

import components as c
import efcm.serving  # noqa: F401  (imports kserve with a clean sys.argv before the deploy body does)
from components.image import IMAGE, SERVING_IMAGE
from efcm import storage
from efcm.manifest import import_manifest, read_manifest

CLASSES = ("normal", "tumour")


def _write_manifest(path, rows, mpp=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "case_id", "uri", "label", *(["mpp"] if mpp else [])])
        w.writerows(rows)
    return path


@pytest.mark.parametrize("component", c.ALL, ids=lambda comp: comp.name)
def test_component_body_imports_only_efcm_and_runs_on_our_image(component):
    body = ast.parse(inspect.getsource(component.python_func).lstrip())
    roots = set()
    for node in ast.walk(body):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    allowed = {"efcm", "shutil", "pathlib"} | ({"kserve"} if component.name == "deploy" else set())
    assert roots <= allowed, f"{component.name} imports {sorted(roots - allowed)}"
    container = component.component_spec.implementation.container
    assert container.image == IMAGE
    assert "pip install" not in " ".join(container.command)  # install_kfp_package=False


def test_import_manifest_makes_relative_slide_uris_absolute(tmp_path):
    src = _write_manifest(
        tmp_path / "data" / "manifest.csv",
        [
            ["s1", "c1", "slides/a.tif", "normal", "0.25"],
            ["s2", "c2", "../other/b.svs", "tumour", ""],
            ["s3", "c3", "/abs/c.svs", "normal", ""],
            ["s4", "c4", "gs://bucket/d.svs", "tumour", ""],
        ],
        mpp=True,
    )
    copy = import_manifest(src, tmp_path / "artifact" / "manifest", CLASSES)
    uris = [s.uri for s in copy.slides]
    assert uris == [
        str(tmp_path / "data" / "slides" / "a.tif"),
        str(tmp_path / "other" / "b.svs"),
        "/abs/c.svs",
        "gs://bucket/d.svs",
    ]
    again = read_manifest(tmp_path / "artifact" / "manifest", CLASSES)
    assert [s.uri for s in again.slides] == uris
    assert [s.mpp for s in again.slides] == [0.25, None, None, None]
    assert [s.case_id for s in again.slides] == ["c1", "c2", "c3", "c4"]


def test_import_manifest_from_gcs_resolves_against_the_manifest_folder(tmp_path, monkeypatch):
    local = _write_manifest(
        tmp_path / "cache" / "manifest.csv",
        [["s1", "c1", "slides/a.svs", "normal"], ["s2", "c2", "../shared/b.svs", "tumour"]],
    )
    seen = []
    monkeypatch.setattr(storage, "download", lambda uri: seen.append(uri) or local)
    copy = import_manifest("gs://bkt/study/v1/manifest.csv", tmp_path / "m.csv", CLASSES)
    assert seen == ["gs://bkt/study/v1/manifest.csv"]
    assert [s.uri for s in copy.slides] == [
        "gs://bkt/study/v1/slides/a.svs",
        "gs://bkt/study/shared/b.svs",
    ]


def test_import_manifest_refuses_a_uri_above_the_bucket(tmp_path, monkeypatch):
    local = _write_manifest(tmp_path / "m.csv", [["s1", "c1", "../../a.svs", "normal"]])
    monkeypatch.setattr(storage, "download", lambda uri: local)
    with pytest.raises(ValueError, match="leaves bucket bkt"):
        import_manifest("gs://bkt/study/manifest.csv", tmp_path / "out.csv", CLASSES)
    assert not (tmp_path / "out.csv").exists()


def test_import_manifest_checks_the_manifest(tmp_path):
    src = _write_manifest(tmp_path / "m.csv", [["s1", "c1", "a.svs", "benign"]])
    with pytest.raises(ValueError, match="benign"):
        import_manifest(src, tmp_path / "out.csv", CLASSES)
    with pytest.raises(FileNotFoundError):
        import_manifest(tmp_path / "absent.csv", tmp_path / "out.csv", CLASSES)


def test_load_manifest_component_writes_the_artifact(tmp_path):
    src = _write_manifest(tmp_path / "ds" / "manifest.csv", [["s1", "c1", "s/a.tif", "tumour"]])
    out = dsl.Dataset(uri=str(tmp_path / "root" / "load-manifest" / "manifest"))
    c.load_manifest.python_func(
        manifest_uri=str(src), dataset={"classes": list(CLASSES)}, manifest=out
    )
    (slide,) = read_manifest(out.path).slides
    assert slide.uri == str(tmp_path / "ds" / "s" / "a.tif")


def test_deploy_component_dry_run_renders_the_package_uri(tmp_path):
    out = dsl.Artifact(uri=str(tmp_path / "deploy" / "inference_service"))
    c.deploy.python_func(
        package=dsl.Model(uri="gs://pipeline-root/efcm/run-1/export/package"),
        export={"model_name": "efcm-demo"},
        namespace="efcm",
        serving_image=SERVING_IMAGE,
        service_account="efcm-serving",
        gpu=True,
        dry_run=True,
        inference_service=out,
    )
    isvc = yaml.safe_load(Path(out.path).read_text())
    assert isvc["metadata"]["name"] == "efcm-demo"
    predictor = isvc["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "efcm-serving"
    env = {e["name"]: e["value"] for e in predictor["containers"][0]["env"]}
    assert env["STORAGE_URI"] == "gs://pipeline-root/efcm/run-1/export/package"


def test_component_params_take_json_numbers():
    from efcm.config import params_from_struct

    params = params_from_struct(
        {"teacher": {"arch": "test_vit", "input_size": 64.0, "model_kwargs": {"img_size": 64.0}}}
    )
    assert params.teacher.model_kwargs == {"img_size": 64}
    assert isinstance(params.teacher.model_kwargs["img_size"], int)
    assert params.teacher.input_size == 64
