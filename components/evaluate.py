"""evaluate: the teacher and every strategy on the same out-of-fold slides, and their cost (GPU)."""

from kfp import dsl
from kfp.dsl import (
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    manifest: Input[Dataset],
    teacher_mil: Input[Model],
    strategies: Input[list[Model]],
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
):
    """`metrics.json`, `strategies.json`, `efficiency.json`, `roc/` and `report.md` in
    `evaluation` (`efcm.stages.evaluate`: case-level intervals, paired student-minus-teacher
    deltas).

    For the Kubeflow UI: every figure of metrics.json goes to `metrics` (`teacher.auc`,
    `student.vfd.retrain.delta_auc_ci_low`, `efficiency.flop_ratio`, ...), the comparison table
    and the efficiency report to `report`, the teacher's out-of-fold ROC and confusion matrix to
    `teacher_roc` (each strategy task logs its own).
    """
    import json
    import shutil
    from pathlib import Path

    from efcm import config, stages
    from efcm.evaluation.table import flat_metrics, prediction_curves
    from efcm.io.cache import SlideCache

    params = config.params_for_stage(
        "evaluate",
        {
            "seed": seed,
            "dataset": dataset,
            "teacher": teacher,
            "distill": distill,
            "mil": mil,
            "extract": extract,
            "evaluate": evaluate,
        },
    )
    result = stages.evaluate(
        teacher_mil.path,
        [s.path for s in strategies],
        evaluation.path,
        params,
        manifest=manifest.path,
        student=student_model.path,
        cache=SlideCache.from_env(),
    )
    for key, value in flat_metrics(result).items():
        metrics.log_metric(key, value)
    shutil.copyfile(Path(evaluation.path) / "report.md", report.path)
    classes = list(params.dataset.classes)
    curve, confusion = prediction_curves(Path(teacher_mil.path), classes)
    teacher_roc.log_roc_curve(*curve)
    teacher_roc.log_confusion_matrix(classes, confusion)
    # The figures also as a file behind each artifact (kfp.local's cache takes an output without
    # a file for a missing one, and a file in the bucket is easier to fetch than MLMD).
    for out in (metrics, teacher_roc):
        Path(out.path).parent.mkdir(parents=True, exist_ok=True)
        Path(out.path).write_text(json.dumps(out.metadata, sort_keys=True))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def image_evaluate(
    manifest: Input[Dataset],
    teacher_heads: Input[Model],
    strategies: Input[list[Model]],
    student_model: Input[Model],
    seed: int,
    image: dict,
    teacher: dict,
    distill: dict,
    extract: dict,
    evaluate: dict,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[Markdown],
):
    """The image twin of `evaluate` (`efcm.stages.evaluate`, `kind="image"`): the teacher's
    probe and every strategy on the same out-of-fold images, with case-level intervals and
    paired deltas, and teacher vs student images/s; the figures to `metrics`, the table to
    `report`."""
    import json
    import shutil
    from pathlib import Path

    from efcm import config, stages
    from efcm.evaluation.table import flat_metrics
    from efcm.io.cache import SlideCache

    sections = {"seed": seed, "image": image, "teacher": teacher, "distill": distill}
    sections.update({"extract": extract, "evaluate": evaluate})
    params = config.params_for_stage("image_evaluate", sections)
    result = stages.evaluate(
        teacher_heads.path,
        [s.path for s in strategies],
        evaluation.path,
        params,
        kind="image",
        manifest=manifest.path,
        student=student_model.path,
        cache=SlideCache.from_env(),
    )
    metrics.metadata.update(flat_metrics(result))  # what `log_metric` does, figure by figure
    shutil.copyfile(Path(evaluation.path) / "report.md", report.path)
    # a file behind the artifact (kfp.local's cache takes an output without one for missing)
    Path(metrics.path).parent.mkdir(parents=True, exist_ok=True)
    Path(metrics.path).write_text(json.dumps(metrics.metadata, sort_keys=True))
