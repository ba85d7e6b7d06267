"""evaluate: the teacher and every strategy on the same out-of-fold slides, and their cost (GPU)."""

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Input, Markdown, Metrics, Model, Output

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
    teacher_roc: Output[ClassificationMetrics],
    reuse_roc: Output[ClassificationMetrics],
    retrain_roc: Output[ClassificationMetrics],
    etc_roc: Output[ClassificationMetrics],
):
    """`metrics.json`, `efficiency.json`, `roc/` and `report.md` in `evaluation`.

    For the Kubeflow UI: every figure of metrics.json goes to `metrics` (`teacher.auc`,
    `student.vfd.retrain.auc_ci_low`, `efficiency.flop_ratio`, ...), the comparison table and the
    efficiency report to `report`, and each row's out-of-fold ROC (the last class against the
    rest) and confusion matrix to `<row>_roc` (empty for a strategy params.yaml skips).
    """
    import json
    import shutil
    from pathlib import Path

    from efcm import config, stages
    from efcm.evaluate import classification_curves, flat_metrics

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
    rows = {"teacher": teacher_roc}
    for strategy, out in (("reuse", reuse_roc), ("retrain", retrain_roc), ("etc", etc_roc)):
        rows[stages.row_name(params, strategy)] = out
    for row, out in rows.items():
        roc, confusion = classification_curves(evaluation.path, row)
        if roc is not None:
            out.log_roc_curve(*roc)
        if confusion is not None:
            out.log_confusion_matrix(list(params.dataset.classes), confusion)
    # The figures also as a file behind each artifact (kfp.local's cache takes an output without
    # a file for a missing one, and a file in the bucket is easier to fetch than MLMD).
    for out in (metrics, *rows.values()):
        Path(out.path).parent.mkdir(parents=True, exist_ok=True)
        Path(out.path).write_text(json.dumps(out.metadata, sort_keys=True))
