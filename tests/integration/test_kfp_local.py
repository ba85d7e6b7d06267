"""The real pipeline function runs end to end under kfp.local (SubprocessRunner, no venv)."""

import csv
import hashlib
import json
import warnings
from pathlib import Path

import h5py
import pytest
import yaml

from efcm.config import params_from_dict
from efcm.export import load_package
from tests.conftest import tiny_params_dict
from tests.kserve_crd import isvc_validator

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def local_kfp(tmp_path):
    """kfp.local for this test only (its configuration is process-global)."""
    import docker

    if not hasattr(docker, "DockerClient"):  # the repo's docker/ folder, a namespace package
        pytest.fail("kfp.local imports the `docker` package: pip install docker (the [dev] extra)")
    from kfp import local

    root = tmp_path / "pipeline_root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    yield root
    local.config.LocalExecutionConfig.instance = None


def _outputs(root: Path) -> dict[str, Path]:
    """'<task>/<output>' -> path, over the single run under the pipeline root."""
    (run,) = [p for p in root.iterdir() if p.is_dir()]
    return {
        f"{task.name}/{out.name}": out
        for task in run.iterdir()
        if task.is_dir()
        for out in task.iterdir()
    }


def test_whole_pipeline_runs_locally_with_dry_run_deploy(local_kfp, tiny_dataset):
    from pipelines.compile import pipeline_arguments
    from pipelines.pipeline import efcm_pipeline

    params = params_from_dict(tiny_params_dict())
    with warnings.catch_warnings():
        # kfp.local ignores accelerators and warns that our image is not a "python" image
        warnings.simplefilter("ignore")
        efcm_pipeline(manifest_uri=str(tiny_dataset), dry_run=True, **pipeline_arguments(params))

    out = _outputs(local_kfp)

    # load_manifest: a checked copy whose relative slide URIs now point at the original folder
    with open(out["load-manifest/manifest"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    for row in rows:
        uri = Path(row["uri"])
        assert uri.is_absolute() and uri.is_file(), row
        assert uri.parent.parent == tiny_dataset.parent

    # patch: one coords h5 per slide, CLAM layout
    coords = sorted((out["patch/patches"] / "patches").glob("*.h5"))
    assert len(coords) == 6
    with h5py.File(coords[0]) as h5:
        assert h5["coords"].ndim == 2 and h5["coords"].shape[1] == 2 and len(h5["coords"]) > 0

    # extract: teacher and student features of every slide
    dims, weights = {}, {}
    for task in ("extract", "extract-2"):
        feats = sorted((out[f"{task}/features"] / "features").glob("*.h5"))
        assert len(feats) == 6, task
        with h5py.File(feats[0]) as h5:
            dims[h5.attrs["encoder"]] = h5["features"].shape[1]
            weights[h5.attrs["encoder"]] = h5.attrs["weights_sha256"]
            assert len(h5["features"]) == len(h5["coords"]) > 0
    assert set(dims) == {"teacher", "student"}

    # distill: the student checkpoint, the one the student features came from
    student_pt = out["distill/student_model"] / "student.pt"
    assert weights["student"] == hashlib.sha256(student_pt.read_bytes()).hexdigest()

    # splits + train_mil: folds, and out-of-fold predictions for both models
    folds = json.loads(out["splits/splits"].read_text())
    assert folds
    for task in ("train-mil", "train-mil-2"):
        preds = (out[f"{task}/mil"] / "predictions.csv").read_text().splitlines()
        assert len(preds) == 1 + 6, task

    # evaluate: metrics.json + the Metrics and Markdown artifacts
    metrics = json.loads((out["evaluate/evaluation"] / "metrics.json").read_text())
    rows = ("teacher", "student.vfd.reuse", "student.vfd.retrain", "student.vfd.etc")
    for model in rows:
        assert 0 <= metrics[model]["auc"] <= 1
    assert out["evaluate/report"].read_text().startswith("# EFCM evaluation")
    executor_output = json.loads((out["evaluate/executor_output.json"]).read_text())
    logged = executor_output["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert {"teacher.auc", "student.vfd.etc.auc", "student.vfd.reuse.auc_ci_low"} <= set(logged)

    # export: a package the one loader accepts
    package = out["export/package"]
    meta = json.loads((package / "model.json").read_text())
    assert meta["classes"] == ["normal", "tumour"]
    assert meta["metrics"]["student.vfd.retrain"]["n"] == 6
    assert load_package(package).feature_dim == dims["student"]

    # deploy (dry run): the rendered InferenceService serves that package
    isvc = yaml.safe_load(out["deploy/inference_service"].read_text())
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert container["name"] == "kserve-container"
    assert {"name": "STORAGE_URI", "value": str(package)} in container["env"]
    assert isvc["metadata"]["name"] == params.export.model_name
    isvc_validator().validate(isvc)  # skips (the rest passed) when the CRD file is absent
