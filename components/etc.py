"""etc: End2end Train CLAM on the IB top-K patches, fold by fold (GPU)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def etc(
    manifest: Input[Dataset],
    patches: Input[Dataset],
    teacher_features: Input[Dataset],
    student_model: Input[Model],
    splits: Input[Dataset],
    seed: int,
    dataset: dict,
    distill: dict,
    train_mil: dict,
    ib: dict,
    mil: dict,
    extract: dict,
    strategy: Output[Model],
):
    """`student_fold_<k>.pt`, `fold_<k>.pt`, `predictions.csv`, `attention.h5` and
    `summary.json` in `strategy` (only a `skipped` summary when etc is not in mil.strategies)."""
    from efcm import config, stages

    params = config.params_from_struct(
        {
            "seed": seed,
            "dataset": dataset,
            "distill": distill,
            "train_mil": train_mil,
            "ib": ib,
            "mil": mil,
            "extract": extract,
        },
        "etc",
    )
    stages.etc(
        manifest.path,
        patches.path,
        teacher_features.path,
        student_model.path,
        splits.path,
        strategy.path,
        params,
    )
