"""The promotion gate: a non-inferiority rule on the paired interval the exported package
records, never on two point estimates alone."""

import json

import pytest
from kfp import dsl

import components as c
from efcm.config import DeployParams
from efcm.evaluation.gate import decide

ROW = "student.fpd.retrain"


def _meta(auc=0.93, delta=-0.02, low=-0.04, high=0.0, teacher=0.95, row=ROW):
    student = {"auc": auc, "delta_auc": delta, "delta_auc_ci_low": low, "delta_auc_ci_high": high}
    return {
        "strategy": "retrain",
        "row": row,
        "metrics": {"teacher": {"auc": teacher}, ROW: student},
    }


@pytest.mark.parametrize(
    ("meta", "cfg", "promote", "why"),
    [
        (_meta(), {"max_auc_drop": 0.05, "min_auc": 0.8}, True, "lower bound -0.0400 >= -0.05"),
        # the point AUC is within the drop, but the interval reaches below it
        (_meta(low=-0.09), {"max_auc_drop": 0.05, "min_auc": 0.8}, False, "reaches -0.0900"),
        (_meta(), {"max_auc_drop": 0.05, "min_auc": 0.95}, False, "not above deploy.min_auc"),
        (_meta(auc=float("nan")), {"max_auc_drop": 0.05, "min_auc": 0.5}, False, "no finite"),
        (_meta(low=None), {"max_auc_drop": 0.05, "min_auc": 0.5}, False, "delta_auc_ci_low"),
        (_meta(row="student.fpd.etc"), {"max_auc_drop": 1, "min_auc": 0}, False, "no finite"),
    ],
)
def test_the_gate_promotes_only_when_non_inferiority_is_shown(meta, cfg, promote, why):
    decision = decide(meta, DeployParams(**cfg))
    assert decision.promote is promote
    assert why in decision.reason
    text = decision.markdown()
    assert text.startswith("# Promotion gate: " + ("PROMOTED" if promote else "NOT PROMOTED"))
    assert "Rule: promote when the lower bound of the paired" in text


def test_a_student_whose_point_auc_passes_but_interval_crosses_the_drop_is_refused():
    cfg = DeployParams(max_auc_drop=0.05, min_auc=0.5)
    point_only = _meta(auc=0.94, delta=-0.01, low=-0.12, high=0.08)
    assert 0.95 - cfg.max_auc_drop <= 0.94  # the old point rule would have promoted it
    decision = decide(point_only, cfg)
    assert not decision.promote and decision.delta_auc_ci_low == -0.12


def test_gate_component_reads_the_package(tmp_path):
    package = tmp_path / "package"
    package.mkdir()
    (package / "model.json").write_text(json.dumps(_meta(low=-0.2)))
    decision = dsl.Markdown(uri=str(tmp_path / "gate" / "decision"))
    verdict = dsl.Artifact(uri=str(tmp_path / "gate" / "verdict"))
    result = c.gate.python_func(
        package=dsl.Model(uri=str(package)),
        deploy={"max_auc_drop": 0.05, "min_auc": 0.5},
        verdict=verdict,
        decision=decision,
    )
    assert result is False
    text = (tmp_path / "gate" / "decision").read_text()
    assert "NOT PROMOTED" in text and ROW in text and "-0.2000" in text
    saved = json.loads((tmp_path / "gate" / "verdict" / "decision.json").read_text())
    assert saved["promote"] is False and saved["row"] == ROW and saved["strategy"] == "retrain"
    assert decision.metadata["promote"] is False
