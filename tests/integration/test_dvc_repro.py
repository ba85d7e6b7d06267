"""`dvc repro` runs the whole local pipeline (real DVC, real stages) on tiny synthetic data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from efcm.models.package import load_package
from efcm.training.ib import read_top_k
from tests.conftest import ROOT, tiny_params_dict

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(cmd: list[str], cwd: Path) -> str:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
    }
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_dvc_repro_end_to_end_then_nothing_to_do(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    shutil.copytree(
        ROOT / "src" / "efcm", work / "src" / "efcm", ignore=shutil.ignore_patterns("__pycache__")
    )
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(), sort_keys=False))
    _run(["git", "init", "-q"], work)
    _run(["dvc", "init", "-q"], work)
    shutil.copy(ROOT / ".dvcignore", work / ".dvcignore")  # __pycache__ is not a code change

    _run(["dvc", "repro"], work)

    metrics = json.loads((work / "runs/evaluate/metrics.json").read_text())
    rows = ["teacher", "student.vfd.reuse", "student.vfd.retrain", "student.vfd.etc"]
    assert set(rows) <= set(metrics)
    for row in rows:
        for key in ("auc", "auc_ci_low", "auc_ci_high", "acc", "f1", "params", "gflops_per_patch"):
            assert key in metrics[row], f"{row}.{key} missing"
        assert 0 <= metrics[row]["auc"] <= 1
        assert metrics[row]["n"] == 6 and metrics[row]["n_cases"] == 6
        assert "bootstrap_dropped" in metrics[row]
    for row in rows[1:]:  # the paired deltas, in metrics.json, dvc metrics show and report.md
        for key in ("delta_auc", "delta_auc_ci_low", "delta_auc_ci_high", "delta_f1"):
            assert key in metrics[row], f"{row}.{key} missing"
    assert 0 <= metrics["teacher"]["localisation_auroc"] <= 1
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], work).strip().splitlines()[-1])
    flat = json.dumps(shown)
    assert '"teacher"' in flat and '"student.vfd.etc"' in flat and '"delta_auc_ci_low"' in flat
    for name in rows:
        roc = (work / f"runs/evaluate/roc/{name}.csv").read_text().splitlines()
        assert roc[0] == "fpr,tpr,threshold" and len(roc) >= 3
    assert "auc_fold_mean" in metrics["teacher"] and len(metrics["teacher"]["confusion"]) == 2
    plots = _run(["dvc", "plots", "show", "--json"], work)
    assert "roc" in plots and "confusion" in plots
    topk = list((work / "runs/strategies/etc").glob("fold_*/topk/*.h5"))  # ETC's IB selection
    assert topk and len(read_top_k(topk[0])[0]) > 0
    report = (work / "runs/evaluate/report.md").read_text()
    assert "| teacher |" in report and "Cost per patch" in report
    assert "Student minus teacher (paired, case-level bootstrap)" in report
    eff = json.loads((work / "runs/evaluate/efficiency.json").read_text())
    assert eff["teacher"]["params"] > 0 and eff["student_teacher_speedup"] > 0
    pkg = load_package(work / "runs/package")
    assert pkg.classes == ["normal", "tumour"] and pkg.meta["row"] == "student.vfd.retrain"
    assert pkg.meta["metrics"]["student.vfd.retrain"] == metrics["student.vfd.retrain"]
    decision = json.loads((work / "runs/gate/decision.json").read_text())
    assert decision["row"] == "student.vfd.retrain" and isinstance(decision["promote"], bool)
    assert decision["delta_auc_ci_low"] == metrics["student.vfd.retrain"]["delta_auc_ci_low"]
    page = (work / "runs/report/index.html").read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert "<svg" in page and "student.vfd.retrain" in page

    second = _run(["dvc", "repro"], work)
    assert "Running stage" not in second, second
    status = _run(["dvc", "status"], work)
    assert "up to date" in status, status
    with open(work / "src/efcm/mil.py", "a") as f:  # a code change is a change
        f.write("\n# edited\n")
    assert "changed deps" in _run(["dvc", "status", "train_mil_teacher"], work)

    # one key switches the method: MCM-KD leaves Reuse CLAM out (auto), and says so
    _run(["git", "add", "-A"], work)
    git_id = ["-c", "user.name=efcm", "-c", "user.email=efcm@localhost"]
    _run(["git", *git_id, "commit", "-qm", "demo"], work)
    _run(["dvc", "exp", "run", "-S", "distill.method=mcm"], work)
    metrics = json.loads((work / "runs/evaluate/metrics.json").read_text())
    assert {"teacher", "student.mcm.retrain", "student.mcm.etc"} <= set(metrics)
    assert not any(k.startswith("student.mcm.reuse") for k in metrics)
    planned = json.loads((work / "runs/evaluate/strategies.json").read_text())
    assert planned["run"] == ["retrain", "etc"] and "MCM-KD" in planned["left_out"]["reuse"]
    report = (work / "runs/evaluate/report.md").read_text()
    assert "## Strategies left out" in report and "- `reuse`: does not apply" in report
    assert load_package(work / "runs/package").meta["row"] == "student.mcm.retrain"
