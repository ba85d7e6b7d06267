"""The real pipeline function runs end to end under kfp.local (SubprocessRunner, no venv, local
caching on): the 6 tiny slides in 2 shards patched and extracted 2 at a time, through the
promotion gate. The first run passes the gate and the deploy step renders its InferenceService
(`dry_run`: kfp.local cannot talk to Kubernetes; the real path is the kserve SDK call, see
tests/unit/test_deploy.py); the second run, with a gate no model can pass, reuses every cached step,
reruns only the uncached resolve_version, the gate and the report that shows its verdict, and
deploys nothing. MCM-KD and FPD runs export ETC's and Reuse CLAM's fold models, each checked
against the evaluation's out-of-fold predictions."""

import csv
import hashlib
import json
import warnings
from pathlib import Path

import h5py
import pytest
import yaml

from efcm.config import params_from_dict
from efcm.models.package import load_package
from tests.conftest import tiny_params_dict
from tests.kserve_crd import isvc_validator

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _runs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)


def _outputs(run: Path) -> dict[str, Path]:
    """'<task>/<output>' -> path over the tasks one run executed; tasks in a ParallelFor iteration
    are '<loop>-iteration-<i>/<task>/<output>'."""
    out = {}
    for task in (p for p in run.iterdir() if p.is_dir()):
        if "-iteration-" in task.name:
            out.update({f"{task.name}/{k}": v for k, v in _outputs(task).items()})
        else:
            out.update({f"{task.name}/{o.name}": o for o in task.iterdir()})
    return out


def _run(pipeline, manifest: Path, **overrides) -> None:
    from pipelines.compile import pipeline_arguments

    args = pipeline_arguments(params_from_dict(tiny_params_dict()))
    args.update(overrides)
    with warnings.catch_warnings():
        # kfp.local ignores accelerators and warns that our image is not a "python" image
        warnings.simplefilter("ignore")
        pipeline(manifest_path=str(manifest), dry_run=True, **args)


def test_pipeline_with_two_shards_through_the_promotion_gate(local_kfp, tiny_dataset):
    from pipelines.pipeline import build_pipeline

    params = params_from_dict(tiny_params_dict())
    pipeline = build_pipeline(parallelism=params.pipeline.parallelism)
    _run(pipeline, tiny_dataset, deploy={"max_auc_drop": 1.0, "min_auc": 0.0})
    (first,) = _runs(local_kfp)
    out = _outputs(first)

    # resolve_dataset (no repository: a plain manifest): checked, slide URIs absolute
    with open(out["resolve-dataset/manifest"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    for row in rows:
        uri = Path(row["uri"])
        assert uri.is_absolute() and uri.is_file(), row
    meta = json.loads(out["resolve-dataset/executor_output.json"].read_text())
    (art,) = meta["artifacts"]["manifest"]["artifacts"]
    assert art["metadata"]["slides"] == 6
    assert art["metadata"]["md5"] == hashlib.md5(tiny_dataset.read_bytes()).hexdigest()

    # two shards of 3 slides, patched and extracted: each shard its own slides, none twice
    for task, sub in (("patch/patches", "patches"), ("extract/features", "features")):
        shard_outs = sorted(k for k in out if "-iteration-" in k and k.endswith(task))
        assert len(shard_outs) == 2, sorted(out)
        shard_slides = [{p.stem for p in (out[k] / sub).glob("*.h5")} for k in shard_outs]
        assert [len(s) for s in shard_slides] == [3, 3], task
        assert shard_slides[0].isdisjoint(shard_slides[1])

    # gathered: one folder with every slide's coords, one with their teacher features, and one
    # with their student features (extracted per shard too, over the same shards)
    gathered = {k: v for k, v in out.items() if k.startswith("gather") and k.endswith("/merged")}
    assert len(gathered) == 3
    by_encoder: dict[str, list[str]] = {}
    for d in gathered.values():
        if (d / "patches").is_dir():
            by_encoder["patches"] = sorted(p.stem for p in (d / "patches").glob("*.h5"))
            continue
        feats = sorted((d / "features").glob("*.h5"))
        with h5py.File(feats[0]) as h5:
            encoder = h5.attrs["encoder"]
            if encoder == "student":
                sha = h5.attrs["weights_sha256"]
        by_encoder[encoder] = [p.stem for p in feats]
    slide_ids = sorted(r["slide_id"] for r in rows)
    assert by_encoder == {"patches": slide_ids, "teacher": slide_ids, "student": slide_ids}
    student_shards = sorted(
        k for k in out if k.startswith("for-loop-2-iteration-") and k.endswith("/features")
    )
    assert len(student_shards) == 2, sorted(out)

    # distill + student extract: the student features come from the distilled checkpoint
    assert (
        sha
        == hashlib.sha256((out["distill/student_model"] / "student.pt").read_bytes()).hexdigest()
    )

    # the strategies: one task each in the `strategies` ParallelFor, with its ROC for the UI
    strategy_outs = {k: v for k, v in out.items() if k.endswith("strategy/strategy")}
    names = {
        json.loads((d / "summary.json").read_text())["strategy"] for d in strategy_outs.values()
    }
    assert names == {"reuse", "retrain", "etc"}

    # evaluate: metrics.json, and the UI's Metrics, Markdown and ClassificationMetrics
    metrics = json.loads((out["evaluate/evaluation"] / "metrics.json").read_text())
    for model in ("teacher", "student.vfd.reuse", "student.vfd.retrain", "student.vfd.etc"):
        assert 0 <= metrics[model]["auc"] <= 1
    assert "delta_auc_ci_low" in metrics["student.vfd.etc"]
    assert out["evaluate/report"].read_text().startswith("# EFCM evaluation")
    executor_output = json.loads(out["evaluate/executor_output.json"].read_text())
    arts = executor_output["artifacts"]
    logged = arts["metrics"]["artifacts"][0]["metadata"]
    assert {"teacher.auc", "student.vfd.etc.auc", "student.vfd.reuse.delta_auc_ci_low"} <= set(
        logged
    )
    teacher_roc = arts["teacher_roc"]["artifacts"][0]["metadata"]
    assert teacher_roc["confidenceMetrics"] and teacher_roc["confusionMatrix"]
    confusion = teacher_roc["confusionMatrix"]
    assert sum(sum(r["row"]) for r in confusion["rows"]) == 6

    # export + gate + deploy (dry run): the rendered InferenceService serves that package
    package = out["export/package"]
    pkg = load_package(package)
    assert pkg.classes == ["normal", "tumour"] and pkg.meta["row"] == "student.vfd.retrain"
    assert out["gate/decision"].read_text().startswith("# Promotion gate: PROMOTED")
    isvc = yaml.safe_load(out["deploy/inference_service"].read_text())
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert {"name": "STORAGE_URI", "value": str(package)} in container["env"]
    assert isvc["metadata"]["name"] == params.export.model_name
    isvc_validator().validate(isvc)

    # report: one HTML page with the audit, heatmaps and QC thumbnails
    page = out["report/page"].read_text()
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") >= 6 + 1
    assert "PROMOTED" in page and "<svg" in page

    # second run: a gate nobody passes (any drop allowed, so the AUROC floor is what fails,
    # whatever the student scored); everything else comes from the cache (the report shows the
    # new verdict)
    _run(pipeline, tiny_dataset, deploy={"max_auc_drop": 1.0, "min_auc": 1.0})
    second = _runs(local_kfp)[1]
    executed = {task.name for task in second.iterdir() if task.is_dir()}
    assert executed == {"resolve-version", "gate", "report"}, executed
    decision = (second / "gate" / "decision").read_text()
    assert decision.startswith("# Promotion gate: NOT PROMOTED")
    assert "not above deploy.min_auc 1" in decision


@pytest.mark.parametrize(
    ("method", "strategies", "exported"),
    [("mcm", ["retrain", "etc"], "etc"), ("fpd", "auto", "reuse")],
)
def test_every_method_runs_on_kubeflow_and_exports_what_it_evaluated(
    local_kfp, tiny_dataset, method, strategies, exported
):
    """MCM-KD with Retrain and ETC (ETC shipped: one fine-tuned student per fold), and FPD with
    all three strategies (Reuse shipped): each component gets the params sections it reads."""
    from pipelines.pipeline import build_pipeline

    raw = tiny_params_dict()
    pipeline = build_pipeline(parallelism=raw["pipeline"]["parallelism"])
    _run(
        pipeline,
        tiny_dataset,
        distill={**raw["distill"], "method": method},
        mil={**raw["mil"], "strategies": strategies},
        export={**raw["export"], "strategy": exported},
        deploy={"max_auc_drop": 1.0, "min_auc": 0.0},
    )
    (run,) = _runs(local_kfp)
    out = _outputs(run)
    metrics = json.loads((out["evaluate/evaluation"] / "metrics.json").read_text())
    planned = ["retrain", "etc"] if method == "mcm" else ["reuse", "retrain", "etc"]
    assert {k for k in metrics if k.startswith("student.")} == {
        f"student.{method}.{n}" for n in planned
    }
    pkg = load_package(out["export/package"])
    assert pkg.meta["strategy"] == exported and pkg.meta["row"] == f"student.{method}.{exported}"
    assert pkg.meta["ensemble"]["per_fold_student"] is (exported == "etc")
    # each fold member reproduces the evaluation's out-of-fold prediction of its test slides
    (strategy_dir,) = [
        v
        for k, v in out.items()
        if k.endswith("strategy/strategy")
        and json.loads((v / "summary.json").read_text())["strategy"] == exported
    ]
    with open(strategy_dir / "predictions.csv", newline="") as f:
        oof = list(csv.DictReader(f))
    with open(out["resolve-dataset/manifest"], newline="") as f:
        uris = {r["slide_id"]: r["uri"] for r in csv.DictReader(f)}
    from efcm.inference import predict_slide
    from efcm.runtimes.torch_runtime import TorchRuntime

    for row in oof[:2]:  # in the evaluation's FP32 arithmetic (no CPU bf16 autocast)
        member = TorchRuntime(pkg.member(int(row["fold"])), cpu_bf16=False)
        got = predict_slide(member, uris[row["slide_id"]], read_workers=0).probabilities
        want = [float(row["prob_normal"]), float(row["prob_tumour"])]
        assert got == pytest.approx(want, abs=1e-4), row["slide_id"]
