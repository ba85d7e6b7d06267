"""splits: patient-level stratified folds, shared by every model (CPU)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def splits(
    manifest: Input[Dataset],
    features: Input[Dataset],
    seed: int,
    dataset: dict,
    train_mil: dict,
    splits: Output[Dataset],
):
    """The folds (JSON) over the slides whose features were extracted ok."""
    from efcm import config, stages

    params = config.params_for_stage(
        "splits", {"seed": seed, "dataset": dataset, "train_mil": train_mil}
    )
    stages.splits(manifest.path, splits.path, params, features_dir=features.path)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def image_splits(
    manifest: Input[Dataset],
    features: Input[Dataset],
    seed: int,
    image: dict,
    splits: Output[Dataset],
):
    """The patient-level folds (JSON) over the labelled images extracted ok."""
    from efcm import config, stages

    params = config.params_for_stage("image_splits", {"seed": seed, "image": image})
    stages.splits(manifest.path, splits.path, params, features_dir=features.path, kind="image")
