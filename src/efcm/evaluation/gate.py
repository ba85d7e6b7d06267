"""The promotion gate: may the exported package be deployed?

The gate reads the package itself (`model.json`): the strategy it ships, the evaluation row that
estimates it, and that row's metrics, so it can only judge what is shipped. The rule is a
non-inferiority test on the paired, case-level bootstrap interval of student minus teacher AUROC
(`efcm.evaluation.metrics.paired_delta`, computed on the same patient resamples for both):

    delta_auc_ci_low >= -deploy.max_auc_drop   and   student AUROC > deploy.min_auc

so a student whose point AUROC is close to the teacher's but whose interval reaches further below
than the allowed drop is not promoted: the evaluation cannot show it is non-inferior. An image
task's rows carry the same keys: for a multi-label task `auc` is the macro AUROC over its classes
(`efcm.evaluation.metrics.multilabel_scores`), and the rule reads it unchanged. A missing or
undefined figure (a one-class evaluation gives NaN) never promotes. The decision, its reason and
the rule go to `decision.json` and `decision.md` (the Kubeflow UI shows the Markdown).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from efcm.config import DeployParams
from efcm.registry import TEACHER_ROW


@dataclass(frozen=True)
class Decision:
    promote: bool
    strategy: str | None  # the strategy the package ships
    row: str | None  # its evaluation row
    student_auc: float | None
    teacher_auc: float | None
    delta_auc: float | None  # student minus teacher, paired
    delta_auc_ci_low: float | None
    delta_auc_ci_high: float | None
    max_auc_drop: float
    min_auc: float
    reason: str
    rule: str

    def markdown(self) -> str:
        verdict = "PROMOTED: the package may be deployed" if self.promote else "NOT PROMOTED"
        interval = f"[{_fmt(self.delta_auc_ci_low)}, {_fmt(self.delta_auc_ci_high)}]"
        return (
            f"# Promotion gate: {verdict}\n\n{self.reason}\n\n"
            f"| | AUROC | student minus teacher (95% CI, paired case-level bootstrap) |\n"
            f"|---|---|---|\n| teacher | {_fmt(self.teacher_auc)} | |\n"
            f"| {self.row} (exported: {self.strategy}) | {_fmt(self.student_auc)} | "
            f"{_fmt(self.delta_auc)} {interval} |\n\n"
            f"Rule: {self.rule}\n"
        )


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.4f}" if v < 0 else f"{v:.4f}"


def _num(values: dict[str, Any], key: str) -> float | None:
    value = values.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value) + 0.0  # + 0.0: a -0.0 difference reads as 0
    return None


def rule_text(cfg: DeployParams) -> str:
    return (
        f"promote when the lower bound of the paired student-minus-teacher AUROC interval is >= "
        f"-{cfg.max_auc_drop:g} (deploy.max_auc_drop: non-inferiority) and the student's AUROC "
        f"is > {cfg.min_auc:g} (deploy.min_auc)"
    )


def decide(package_meta: dict[str, Any], cfg: DeployParams) -> Decision:
    """The gate's decision on an exported package's `model.json`."""
    strategy, row = package_meta.get("strategy"), package_meta.get("row")
    metrics = package_meta.get("metrics") or {}
    student = metrics.get(row, {}) if row else {}
    teacher = metrics.get(TEACHER_ROW, {})
    figures = {
        "student_auc": _num(student, "auc"),
        "teacher_auc": _num(teacher, "auc"),
        "delta_auc": _num(student, "delta_auc"),
        "delta_auc_ci_low": _num(student, "delta_auc_ci_low"),
        "delta_auc_ci_high": _num(student, "delta_auc_ci_high"),
    }
    drop, floor = cfg.max_auc_drop, cfg.min_auc
    low, auc = figures["delta_auc_ci_low"], figures["student_auc"]
    missing = [k for k in ("student_auc", "delta_auc", "delta_auc_ci_low") if figures[k] is None]
    if not row or missing:
        reason = (
            f"the package records no finite {' and '.join(missing) or 'evaluation row'} for "
            f"{row or 'its strategy'}: nothing shows the student is non-inferior"
        )
        promote = False
    elif low < -drop:  # type: ignore[operator]
        reason = (
            f"{row}: the paired interval of student minus teacher AUROC reaches {low:+.4f}, "
            f"below the allowed drop of -{drop:g} (point estimate {figures['delta_auc']:+.4f}): "
            "non-inferiority is not shown"
        )
        promote = False
    elif not auc > floor:  # type: ignore[operator]
        reason = f"{row}: AUROC {auc:.4f} is not above deploy.min_auc {floor:g}"
        promote = False
    else:
        reason = (
            f"{row}: student minus teacher AUROC {figures['delta_auc']:+.4f}, interval lower bound "
            f"{low:+.4f} >= -{drop:g}, and AUROC {auc:.4f} > {floor:g}"
        )
        promote = True
    return Decision(
        promote, strategy, row, **figures, max_auc_drop=drop, min_auc=floor, reason=reason,
        rule=rule_text(cfg),
    )  # fmt: skip


def write_decision(decision: Decision, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decision.json").write_text(json.dumps(asdict(decision), indent=2) + "\n")
    (out / "decision.md").write_text(decision.markdown())
    return out
