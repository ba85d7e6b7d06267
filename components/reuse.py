"""reuse: Reuse CLAM, the teacher's fold CLAMs on the student's features."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def reuse(
    manifest: Input[Dataset],
    teacher_mil: Input[Model],
    student_features: Input[Dataset],
    splits: Input[Dataset],
    seed: int,
    dataset: dict,
    distill: dict,
    mil: dict,
    strategy: Output[Model],
):
    """`fold_<k>.pt`, `predictions.csv`, `attention.h5` and `summary.json` in `strategy` (only a
    summary saying `skipped` when reuse is not in mil.strategies)."""
    from efcm import config, stages

    params = config.params_from_struct(
        {"seed": seed, "dataset": dataset, "distill": distill, "mil": mil}, "reuse"
    )
    stages.reuse(
        manifest.path, teacher_mil.path, student_features.path, splits.path, strategy.path, params
    )
