"""The KFP components as plain functions (`python_func`), and the manifest import they rely on."""

import ast
import csv
import hashlib
import inspect
from pathlib import Path

import pytest
import yaml
from kfp import dsl

import components as c
import efcm.serving._kserve  # noqa: F401  (kserve, with a clean sys.argv, before deploy's body)
from components.image import IMAGE, SERVING_CPU_IMAGE, SERVING_IMAGE
from efcm.errors import BatchFailed
from efcm.io.cache import SlideCache
from efcm.io.dataset import select_shard
from efcm.io.manifest import import_manifest, read_manifest
from efcm.io.status import read_status, write_status

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
    stdlib = {"json", "pathlib", "shutil", "tempfile", "time"}
    adapters = {"deploy": {"kserve"}, "resolve-dataset": {"dvc", "dvc_data"}}
    adapters["resolve-version"] = {"dvc"}
    allowed = {"efcm"} | stdlib | adapters.get(component.name, set())
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


def test_import_manifest_from_gcs_resolves_against_the_manifest_folder(gcs_bucket, tmp_path):
    src = _write_manifest(
        tmp_path / "src" / "manifest.csv",
        [["s1", "c1", "slides/a.svs", "normal"], ["s2", "c2", "../shared/b.svs", "tumour"]],
    )
    uri = gcs_bucket.upload_file(src, "study/v1/manifest.csv")
    cache = SlideCache(tmp_path / "cache", 1 << 30)
    copy = import_manifest(uri, tmp_path / "m.csv", CLASSES, cache=cache)
    assert cache.stats.objects == 1  # the manifest, staged through the cache it was given
    assert [s.uri for s in copy.slides] == [
        gcs_bucket.uri("study/v1/slides/a.svs"),
        gcs_bucket.uri("study/shared/b.svs"),
    ]


def test_import_manifest_refuses_a_uri_above_the_bucket(gcs_bucket, tmp_path):
    src = _write_manifest(tmp_path / "m.csv", [["s1", "c1", "../../a.svs", "normal"]])
    uri = gcs_bucket.upload_file(src, "study/manifest.csv")
    with pytest.raises(ValueError, match=f"leaves bucket {gcs_bucket.name}"):
        import_manifest(
            uri, tmp_path / "out.csv", CLASSES, cache=SlideCache(tmp_path / "c", 1 << 30)
        )
    assert not (tmp_path / "out.csv").exists()


def test_import_manifest_checks_the_manifest(tmp_path):
    src = _write_manifest(tmp_path / "m.csv", [["s1", "c1", "a.svs", "benign"]])
    with pytest.raises(ValueError, match="benign"):
        import_manifest(src, tmp_path / "out.csv", CLASSES)
    with pytest.raises(FileNotFoundError):
        import_manifest(tmp_path / "absent.csv", tmp_path / "out.csv", CLASSES)


def test_resolve_dataset_component_without_a_repository_imports_the_manifest(tmp_path):
    src = _write_manifest(tmp_path / "ds" / "manifest.csv", [["s1", "c1", "s/a.tif", "tumour"]])
    version = c.resolve_version.python_func(repo_url="", revision="main", manifest_path=str(src))
    assert version == hashlib.md5(src.read_bytes()).hexdigest()
    out = dsl.Dataset(uri=str(tmp_path / "root" / "resolve-dataset" / "manifest"))
    c.resolve_dataset.python_func(
        repo_url="",
        revision="main",
        manifest_path=str(src),
        version=version,
        dataset={"classes": list(CLASSES)},
        manifest=out,
    )
    (slide,) = read_manifest(out.path).slides
    assert slide.uri == str(tmp_path / "ds" / "s" / "a.tif")
    assert out.metadata["md5"] == version and out.metadata["slides"] == 1


def _shard_output(folder: Path, slides: list[str], status: str = "ok") -> dsl.Dataset:
    (folder / "patches").mkdir(parents=True)
    for sid in slides:
        (folder / "patches" / f"{sid}.h5").write_bytes(sid.encode())
    rows = [
        {"slide_id": s, "status": status, "reason": "" if status == "ok" else "bad"} for s in slides
    ]
    write_status(folder / "status.csv", rows)
    return dsl.Dataset(uri=str(folder))


def _gather(shards, out: Path, **patch) -> dsl.Dataset:
    merged = dsl.Dataset(uri=str(out))
    c.gather.python_func(
        shards=shards, stage="patch", dataset={"classes": list(CLASSES)}, patch=patch, merged=merged
    )
    return merged


def test_plan_shards_and_gather_fan_out_and_back(tmp_path):
    rows = [[f"s{i}", f"c{i}", f"/x/s{i}.svs", "normal"] for i in range(5)]
    manifest = _write_manifest(tmp_path / "m.csv", rows)
    assert c.plan_shards.python_func(manifest=dsl.Dataset(uri=str(manifest)), shard_size=3) == [
        0,
        1,
    ]
    shards = [
        _shard_output(tmp_path / "a", ["s0", "s1", "s2"]),
        _shard_output(tmp_path / "b", ["s3", "s4"]),
    ]
    merged = _gather(shards, tmp_path / "merged")
    assert sorted(p.name for p in (tmp_path / "merged" / "patches").iterdir()) == [
        f"s{i}.h5" for i in range(5)
    ]
    assert [r["slide_id"] for r in read_status(tmp_path / "merged" / "status.csv")] == [
        f"s{i}" for i in range(5)
    ]
    assert merged.metadata == {"shards": 2, "ok": 5}
    # a retried gather writes over its own first try
    assert _gather(shards, tmp_path / "merged").metadata == {"shards": 2, "ok": 5}

    twice = [shards[0], _shard_output(tmp_path / "c", ["s2"])]
    with pytest.raises(ValueError, match="slide s2 is in two shards"):
        _gather(twice, tmp_path / "m2")


def test_a_failed_shard_fails_the_run_only_as_the_whole_batch_would(tmp_path):
    """patch.fail_on applies to the gathered batch: one shard of bad slides is not a failed run
    (fail_on: all), but is with fail_on: any; every slide failing fails it."""
    good = _shard_output(tmp_path / "good", ["s0", "s1"])
    bad = _shard_output(tmp_path / "bad", ["s2"], status="unreadable")
    merged = _gather([good, bad], tmp_path / "all", fail_on="all")
    assert merged.metadata == {"shards": 2, "ok": 2, "unreadable": 1}
    with pytest.raises(BatchFailed, match=r"patch: 1 slide\(s\) failed \(s2: bad\)"):
        _gather([good, bad], tmp_path / "any", fail_on="any")
    with pytest.raises(BatchFailed, match="every slide failed"):
        _gather([bad], tmp_path / "none", fail_on="all")


def test_select_shard_names_a_shard_that_does_not_exist(tmp_path):
    rows = [[f"s{i}", f"c{i}", f"/x/s{i}.svs", "normal"] for i in range(5)]
    m = read_manifest(_write_manifest(tmp_path / "m.csv", rows))
    assert [s.slide_id for s in select_shard(m, 1, 3).slides] == ["s3", "s4"]
    with pytest.raises(ValueError, match="shard 2 does not exist"):
        select_shard(m, 2, 3)
    with pytest.raises(ValueError, match="shard_size must be >= 1"):
        select_shard(m, 0, 0)


def _deploy_dry_run(tmp_path: Path, *, gpu: bool) -> dict:
    out = dsl.Artifact(uri=str(tmp_path / "deploy" / "inference_service"))
    c.deploy.python_func(
        package=dsl.Model(uri="gs://pipeline-root/efcm/run-1/export/package"),
        export={"model_name": "efcm-demo"},
        namespace="efcm",
        serving_image=SERVING_IMAGE,
        serving_cpu_image=SERVING_CPU_IMAGE,
        service_account="efcm-serving",
        gpu=gpu,
        dry_run=True,
        inference_service=out,
    )
    return yaml.safe_load(Path(out.path).read_text())


def test_deploy_component_dry_run_renders_the_package_uri(tmp_path):
    isvc = _deploy_dry_run(tmp_path, gpu=True)
    assert isvc["metadata"]["name"] == "efcm-demo"
    predictor = isvc["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "efcm-serving"
    env = {e["name"]: e["value"] for e in predictor["containers"][0]["env"]}
    assert env["STORAGE_URI"] == "gs://pipeline-root/efcm/run-1/export/package"
    # on a GPU node: the CUDA image, whose server picks torch itself
    assert predictor["containers"][0]["image"] == SERVING_IMAGE and "EFCM_RUNTIME" not in env


def test_deploy_component_on_cpu_nodes_serves_the_torch_free_image_with_int8(tmp_path):
    (container,) = _deploy_dry_run(tmp_path, gpu=False)["spec"]["predictor"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["image"] == SERVING_CPU_IMAGE and env["EFCM_RUNTIME"] == "int8"
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


def test_component_params_take_json_numbers():
    from efcm.config import params_from_struct

    params = params_from_struct(
        {"teacher": {"arch": "test_vit", "input_size": 64.0, "model_kwargs": {"img_size": 64.0}}}
    )
    assert params.teacher.model_kwargs == {"img_size": 64}
    assert isinstance(params.teacher.model_kwargs["img_size"], int)
    assert params.teacher.input_size == 64
