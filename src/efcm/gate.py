"""The promotion gate: is the exported student good enough to deploy?

The exported package is the student with its retrained CLAM (`efcm export` packages
`train_mil_student`), so the gate compares the evaluation row `student.<method>.retrain` with the
`teacher` row, on the same out-of-fold slides: promote when

    student AUROC >= teacher AUROC - deploy.max_auc_drop   and   student AUROC > deploy.min_auc.

A missing or undefined AUROC (a one-class evaluation gives NaN) never promotes. The decision and its
reason go to `decision.json` and `decision.md` (the Kubeflow UI shows the Markdown).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from efcm.config import Params

EXPORTED_STRATEGY = "retrain"


@dataclass(frozen=True)
class Decision:
    promote: bool
    student: str  # the evaluation row of the exported model
    student_auc: float | None
    teacher_auc: float | None
    max_auc_drop: float
    min_auc: float
    reason: str

    def markdown(self) -> str:
        verdict = "PROMOTED: the package may be deployed" if self.promote else "NOT PROMOTED"
        return (
            f"# Promotion gate: {verdict}\n\n{self.reason}\n\n"
            f"| | AUROC |\n|---|---|\n| teacher | {_fmt(self.teacher_auc)} |\n"
            f"| {self.student} (exported) | {_fmt(self.student_auc)} |\n\n"
            f"Rule: student AUROC >= teacher AUROC - {self.max_auc_drop:g} "
            f"(deploy.max_auc_drop) and > {self.min_auc:g} (deploy.min_auc).\n"
        )


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _auc(metrics: dict[str, Any], row: str) -> float | None:
    value = metrics.get(row, {}).get("auc")
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def exported_row(params: Params) -> str:
    from efcm.stages import row_name

    return row_name(params, EXPORTED_STRATEGY)


def decide(metrics: dict[str, Any], params: Params) -> Decision:
    """The gate's decision on an evaluation's metrics (the dict of `metrics.json`)."""
    row = exported_row(params)
    drop, floor = params.deploy.max_auc_drop, params.deploy.min_auc
    student, teacher = _auc(metrics, row), _auc(metrics, "teacher")
    if student is None or teacher is None:
        missing = [name for name, v in ((row, student), ("teacher", teacher)) if v is None]
        reason = f"no finite AUROC for {' and '.join(missing)} in the evaluation"
        promote = False
    elif student < teacher - drop:
        reason = (
            f"{row} AUROC {student:.4f} is more than {drop:g} below the teacher's {teacher:.4f} "
            f"(drop {teacher - student:.4f})"
        )
        promote = False
    elif not student > floor:
        reason = f"{row} AUROC {student:.4f} is not above deploy.min_auc {floor:g}"
        promote = False
    else:
        reason = (
            f"{row} AUROC {student:.4f} vs teacher {teacher:.4f}: within {drop:g} of the "
            f"teacher and above {floor:g}"
        )
        promote = True
    return Decision(promote, row, student, teacher, drop, floor, reason)


def write_decision(decision: Decision, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decision.json").write_text(json.dumps(asdict(decision), indent=2) + "\n")
    (out / "decision.md").write_text(decision.markdown())
    return out
