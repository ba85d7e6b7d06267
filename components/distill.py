"""distill: train the student on the cached teacher features (GPU)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def distill(
    manifest: Input[Dataset],
    patches: Input[Dataset],
    teacher_features: Input[Dataset],
    seed: int,
    dataset: dict,
    student: dict,
    distill: dict,
    store: dict,
    student_model: Output[Model],
    gpus: int = 1,
):
    """`student.pt` and the distillation `metrics.json` in the `student_model` directory; with
    `gpus` > 1 (the pod's GPUs), as that many DDP processes under torchrun."""
    from efcm import config, stages
    from efcm.io.cache import SlideCache

    params = config.params_for_stage(
        "distill",
        {
            "seed": seed,
            "dataset": dataset,
            "student": student,
            "distill": distill,
            "store": store,
        },
    )
    stages.distill(
        manifest.path,
        patches.path,
        teacher_features.path,
        student_model.path,
        params,
        processes=gpus,
        cache=SlideCache.from_env(),
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def image_distill(
    manifest: Input[Dataset],
    teacher_features: Input[Dataset],
    seed: int,
    image: dict,
    student: dict,
    distill: dict,
    student_model: Output[Model],
    gpus: int = 1,
):
    """The student distilled on the manifest's images (labels unused) and the teacher's image
    features: `student.pt` and `metrics.json` in `student_model`; with `gpus` > 1, as that many
    DDP processes under torchrun."""
    from efcm import config, stages
    from efcm.io.cache import SlideCache

    params = config.params_for_stage(
        "image_distill", {"seed": seed, "image": image, "student": student, "distill": distill}
    )
    stages.distill_images(
        manifest.path,
        student_model.path,
        params,
        teacher_features=teacher_features.path,
        processes=gpus,
        cache=SlideCache.from_env(),
    )
