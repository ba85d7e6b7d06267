"""evaluate: teacher vs student on the same out-of-fold slides, and their cost (GPU)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    teacher_mil: Input[Model],
    student_mil: Input[Model],
    student_model: Input[Model],
    seed: int,
    dataset: dict,
    teacher: dict,
    evaluate: dict,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """`metrics.json`, `roc/` and `report.md` in `evaluation`.

    The metrics also go to `metrics` (`teacher.auc`, `student.auc_ci_low`,
    `efficiency.flop_ratio`, ...), the report to `report`.
    """
    import shutil
    from pathlib import Path

    from efcm import config, stages
    from efcm.evaluate import flat_metrics

    params = config.params_from_struct(
        {"seed": seed, "dataset": dataset, "teacher": teacher, "evaluate": evaluate}, "evaluate"
    )
    result = stages.evaluate(
        {"teacher": teacher_mil.path, "student": student_mil.path},
        evaluation.path,
        params,
        student=student_model.path,
    )
    for key, value in flat_metrics(result).items():
        metrics.log_metric(key, value)
    shutil.copyfile(Path(evaluation.path) / "report.md", report.path)
