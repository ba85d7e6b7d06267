"""The component image runs the pipeline: kfp.local's DockerRunner, against the container engine's
Docker-compatible API (podman's own `podman system service` here), runs every task of the tiny
pipeline in a container of the component image, as the image's own user (10001), through the
promotion gate to the deploy step's rendered InferenceService (`dry_run`: no Kubernetes here).

DockerRunner mounts only the pipeline root into each container (at the same path), so the tiny
dataset is written inside it; the pipeline root belongs to the image's user, as a pod's volume
would. One change to docker-py's client is needed for podman, said in
tests/kfp_local.py `docker_runner_on_podman`: containers are not auto-removed, so each task's real
exit code is read.
"""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import pytest
import yaml

from efcm.config import params_from_dict
from efcm.models.package import load_package
from efcm.stages import demo_data
from tests import containers
from tests.conftest import tiny_params_dict
from tests.kfp_local import docker_runner_on_podman, local_pipeline_runs
from tests.kserve_crd import isvc_validator

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.container]


def _task_dir(run_root: Path, executor_input: dict) -> Path:
    """The task's output folder (`<run>/<task>` or `<run>/<loop>-iteration-<i>/<task>`): where
    kfp.local asks the executor to write its executor_output.json."""
    return Path(executor_input["outputs"]["outputFile"]).parent.relative_to(run_root)


def test_every_task_runs_in_the_component_image_through_the_gate(images, tmp_path):
    from kfp import local

    from pipelines.compile import pipeline_arguments
    from pipelines.pipeline import build_pipeline

    image = images["component"]
    user = containers.image_config(image)["User"]
    uid, gid = (int(x) for x in user.split(":"))
    assert uid != 0

    pipeline_root = tmp_path / "pipeline_root"
    params = params_from_dict(tiny_params_dict())
    manifest = demo_data(pipeline_root / "data", params)
    # the containers' user writes the runs' folders; root (this process) reads them
    for p in [pipeline_root, *pipeline_root.rglob("*")]:
        os.chown(p, uid, gid)

    args = pipeline_arguments(params)
    args["deploy"] = {"max_auc_drop": 1.0, "min_auc": 0.0}
    pipeline = build_pipeline(image=image, parallelism=params.pipeline.parallelism)
    with (
        containers.docker_api() as docker_host,
        docker_runner_on_podman(docker_host) as ran,
        local_pipeline_runs(pipeline_root, tmp_path / "kfp_cache", runner=local.DockerRunner()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # kfp.local ignores accelerators
        pipeline(manifest_path=str(manifest), dry_run=True, **args)

    (run,) = [p for p in pipeline_root.iterdir() if p.is_dir() and p.name != "data"]
    # every task that wrote outputs ran in a container of the component image, as its user
    task_dirs = {
        p.parent.relative_to(run) for p in run.rglob("executor_output.json") if p.is_file()
    }
    by_task = {_task_dir(run, r.executor_input()): r for r in ran}
    assert set(by_task) == task_dirs and len(ran) == len(task_dirs), (sorted(by_task), task_dirs)
    assert len(task_dirs) >= 10, sorted(task_dirs)
    for task, r in by_task.items():
        assert r.image == image, (task, r.image)
        assert r.user == user, (task, r.user)
        assert r.exit_code == 0, (task, r.log[-3000:])
        assert "Traceback" not in r.log, (task, r.log[-3000:])

    # through the gate: the gate promoted the package and the deploy step rendered it
    out = {str(p.relative_to(run)): p for p in run.rglob("*")}
    with open(out["resolve-dataset/manifest"], newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
    package = out["export/package"]
    assert load_package(package).classes == ["normal", "tumour"]
    assert out["gate/decision"].read_text().startswith("# Promotion gate: PROMOTED")
    isvc = yaml.safe_load(out["deploy/inference_service"].read_text())
    isvc_validator().validate(isvc)
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert {"name": "STORAGE_URI", "value": str(package)} in container["env"]
