"""evaluate: the teacher and every strategy on the same out-of-fold slides, and their cost (GPU)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Markdown, Metrics, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    teacher_mil: Input[Model],
    reuse_mil: Input[Model],
    retrain_mil: Input[Model],
    etc_mil: Input[Model],
    student_model: Input[Model],
    seed: int,
    dataset: dict,
    teacher: dict,
    distill: dict,
    mil: dict,
    extract: dict,
    evaluate: dict,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """`metrics.json`, `efficiency.json`, `roc/` and `report.md` in `evaluation`.

    The metrics also go to `metrics` (`teacher.auc`, `student.vfd.retrain.auc_ci_low`,
    `efficiency.flop_ratio`, ...), the report to `report`.
    """
    import shutil
    from pathlib import Path

    from efcm import config, stages
    from efcm.evaluate import flat_metrics

    params = config.params_from_struct(
        {
            "seed": seed,
            "dataset": dataset,
            "teacher": teacher,
            "distill": distill,
            "mil": mil,
            "extract": extract,
            "evaluate": evaluate,
        },
        "evaluate",
    )
    result = stages.evaluate(
        {
            "teacher": teacher_mil.path,
            "reuse": reuse_mil.path,
            "retrain": retrain_mil.path,
            "etc": etc_mil.path,
        },
        evaluation.path,
        params,
        student=student_model.path,
    )
    for key, value in flat_metrics(result).items():
        metrics.log_metric(key, value)
    shutil.copyfile(Path(evaluation.path) / "report.md", report.path)
