"""extract: patch features with the teacher, or with the distilled student (GPU)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def extract(
    manifest: Input[Dataset],
    patches: Input[Dataset],
    dataset: dict,
    teacher: dict,
    extract: dict,
    encoder: str,
    features: Output[Dataset],
    student_model: Input[Model] | None = None,
):
    """`features/<slide_id>.h5` and `status.csv`; `encoder` is `teacher` or `student` (which needs
    `student_model`, the distill output)."""
    from efcm import config, stages

    params = config.params_from_struct(
        {"dataset": dataset, "teacher": teacher, "extract": extract}, f"extract ({encoder})"
    )
    stages.extract(
        manifest.path,
        patches.path,
        features.path,
        params,
        encoder=encoder,
        student=getattr(student_model, "path", None),
    )
