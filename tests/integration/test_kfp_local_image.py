"""The image pipeline (pipelines/image_pipeline.py) runs end to end under kfp.local
(SubprocessRunner, no venv, local caching on) on a tiny synthetic fundus demo, with the shipped
pipelines/image/params.yaml made tinier as in the `dvc repro` test: teacher and student
extraction, distillation, the teacher's probe, one task per image strategy the run compares,
evaluation, the image package, the gate on it and the deploy step's InferenceService (`dry_run`:
kfp.local cannot talk to Kubernetes)."""

import json
import warnings
from pathlib import Path

import pytest
import yaml

from efcm import registry
from efcm.config import params_from_dict
from tests.conftest import ROOT, _merge
from tests.integration.test_dvc_repro_image import TINIER
from tests.integration.test_kfp_local import _outputs, _runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_image_pipeline_scores_teacher_and_students_and_gates_the_image_package(
    local_kfp, tmp_path
):
    from efcm.stages import demo_data
    from pipelines.compile import pipeline_arguments
    from pipelines.image_pipeline import build_image_pipeline

    shipped = yaml.safe_load((ROOT / "pipelines/image/params.yaml").read_text())
    params = params_from_dict(_merge(shipped, TINIER))
    manifest = demo_data(tmp_path / "demo", params, kind="fundus")
    args = pipeline_arguments(params, "image")
    args["deploy"] = {"max_auc_drop": 1.0, "min_auc": 0.0}  # any model passes: deploy renders
    with warnings.catch_warnings():
        # kfp.local ignores accelerators and warns that our image is not a "python" image
        warnings.simplefilter("ignore")
        build_image_pipeline()(manifest_path=str(manifest), dry_run=True, **args)
    (run,) = _runs(local_kfp)
    out = _outputs(run)

    # one strategy task per image strategy the run compares (none skipped)
    planned, _ = registry.resolve_image(params.distill.method, params.image.strategies)
    summaries = [
        json.loads((v / "summary.json").read_text())
        for k, v in out.items()
        if k.endswith("image-strategy/strategy")
    ]
    assert sorted(s["strategy"] for s in summaries) == sorted(planned)
    assert not any(s.get("skipped") for s in summaries)

    # evaluate: the teacher's probe and every student row, with paired deltas
    metrics = json.loads((out["image-evaluate/evaluation"] / "metrics.json").read_text())
    students = [registry.row_name(params.distill.method, n) for n in planned]
    assert {registry.TEACHER_ROW, *students} <= set(metrics)
    labelled = params.image.demo.images - params.image.demo.unlabelled
    for row in (registry.TEACHER_ROW, *students):
        assert 0 <= metrics[row]["auc"] <= 1 and metrics[row]["n"] == labelled, row
    assert not any(k.startswith("delta_") for k in metrics[registry.TEACHER_ROW])
    for row in students:
        assert {"delta_auc", "delta_auc_ci_low", "delta_auc_ci_high"} <= set(metrics[row]), row
    logged = json.loads(out["image-evaluate/metrics"].read_text())
    assert f"{students[0]}.delta_auc_ci_low" in logged
    assert "Image-level metrics" in out["image-evaluate/report"].read_text()

    # export: the image package of image.export_strategy, one head per fold
    package = out["image-export/package"]
    model = json.loads((package / "model.json").read_text())
    exported = params.image.export_strategy
    row = registry.row_name(params.distill.method, exported)
    assert model["kind"] == "image" and model["strategy"] == exported and model["row"] == row
    folds = params.image.folds
    assert model["ensemble"]["heads"] == [f"head_fold_{k}.pt" for k in range(folds)]
    assert all((package / h).is_file() for h in model["ensemble"]["heads"])
    assert model["metrics"][row] == metrics[row]

    # gate on the package: its row judged and promoted; deploy renders the image package's service
    decision = json.loads((out["gate/verdict"] / "decision.json").read_text())
    assert decision["row"] == row and decision["promote"] is True
    assert decision["delta_auc_ci_low"] == metrics[row]["delta_auc_ci_low"]
    isvc = yaml.safe_load(out["deploy/inference_service"].read_text())
    assert isvc["metadata"]["name"] == params.export.model_name
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert {"name": "STORAGE_URI", "value": str(package)} in container["env"]
    # resolve-dataset: the checked manifest of every demo image, its URIs made absolute
    manifest_rows = (out["image-resolve-dataset/manifest"]).read_text().splitlines()
    assert len(manifest_rows) == 1 + params.image.demo.images
    assert all(Path(r.split(",")[2]).is_absolute() for r in manifest_rows[1:])
