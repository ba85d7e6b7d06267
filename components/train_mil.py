"""train_mil: CLAM per fold on a features directory, with out-of-fold predictions (GPU)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_mil(
    manifest: Input[Dataset],
    features: Input[Dataset],
    splits: Input[Dataset],
    seed: int,
    dataset: dict,
    train_mil: dict,
    mil: Output[Model],
):
    """`fold_<k>.pt`, `predictions.csv` and `summary.json` in the `mil` directory."""
    from efcm import config, stages

    params = config.params_for_stage(
        "train_mil", {"seed": seed, "dataset": dataset, "train_mil": train_mil}
    )
    stages.train_mil(manifest.path, features.path, splits.path, mil.path, params)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def image_train_mil(
    manifest: Input[Dataset],
    features: Input[Dataset],
    splits: Input[Dataset],
    seed: int,
    image: dict,
    teacher: dict,
    heads: Output[Model],
):
    """The teacher's linear probe per fold on its image features (the evaluation's teacher
    row): the fold heads, `predictions.csv` and `summary.json` in `heads`; with
    `image.teacher_finetune`, also the teacher fine-tuned end to end on the manifest's images
    (the `teacher.finetune` row) in `heads`/finetune."""
    from efcm import config, stages
    from efcm.io.cache import SlideCache

    params = config.params_for_stage(
        "image_train_mil", {"seed": seed, "image": image, "teacher": teacher}
    )
    stages.train_mil(
        manifest.path, features.path, splits.path, heads.path, params, kind="image",
        cache=SlideCache.from_env(),
    )  # fmt: skip
