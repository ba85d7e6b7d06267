"""export: the deployable model package (student + its CLAM + model.json) (CPU)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def export(
    student_model: Input[Model],
    student_mil: Input[Model],
    evaluation: Input[Artifact],
    dataset: dict,
    patch: dict,
    teacher: dict,
    distill: dict,
    export: dict,
    package: Output[Model],
):
    """The package directory (`efcm.export.load_package` reads it), with the evaluation metrics."""
    from pathlib import Path

    from efcm import config, stages

    params = config.params_from_struct(
        {
            "dataset": dataset,
            "patch": patch,
            "teacher": teacher,
            "distill": distill,
            "export": export,
        },
        "export",
    )
    stages.export(
        student_model.path,
        student_mil.path,
        package.path,
        params,
        metrics_path=Path(evaluation.path) / "metrics.json",
    )
