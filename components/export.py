"""export: the deployable model package (export.strategy's fold models + model.json) (CPU)."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def export(
    student_model: Input[Model],
    strategies: Input[list[Model]],
    evaluation: Input[Artifact],
    patches: Input[Dataset],
    manifest: Input[Dataset],
    teacher_features: Input[Dataset],
    dataset: dict,
    patch: dict,
    teacher: dict,
    distill: dict,
    mil: dict,
    export: dict,
    store: dict,
    package: Output[Model],
):
    """The package directory (`efcm.runtimes.load_runtime` serves it): the k fold models of
    `export.strategy` as one ensemble, its evaluation row and metrics, the patch geometry read
    from the training coords files, and the CPU runtimes of `export.runtimes` (ONNX FP32, INT8),
    checked for parity on the evaluation slides of `manifest` (with `store.enabled`, their
    pixels from the patch-shard store in `teacher_features`)."""
    import json
    from pathlib import Path

    from efcm import config, stages
    from efcm.io.cache import SlideCache

    params = config.params_for_stage(
        "export",
        {
            "dataset": dataset,
            "patch": patch,
            "teacher": teacher,
            "distill": distill,
            "mil": mil,
            "export": export,
            "store": store,
        },
    )
    stages.export(
        student_model.path,
        [s.path for s in strategies],
        package.path,
        params,
        metrics_path=Path(evaluation.path) / "metrics.json",
        patches_dir=patches.path,
        manifest=manifest.path,
        teacher_features=teacher_features.path,
        cache=SlideCache.from_env(),
    )
    meta = json.loads((Path(package.path) / "model.json").read_text())
    package.metadata.update({"strategy": meta["strategy"], "row": meta["row"]})


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def image_export(
    student_model: Input[Model],
    strategies: Input[list[Model]],
    evaluation: Input[Artifact],
    student_features: Input[Dataset],
    manifest: Input[Dataset],
    splits: Input[Dataset],
    seed: int,
    image: dict,
    teacher: dict,
    distill: dict,
    export: dict,
    package: Output[Model],
):
    """The image package of `image.export_strategy` (`efcm.stages.export_images`): its fold
    heads (or fine-tuned students) as one ensemble with the preprocessing they were trained on,
    its evaluation row and thresholds, and its CPU runtimes checked on the evaluation images."""
    import json
    from pathlib import Path

    from efcm import config, stages
    from efcm.io.cache import SlideCache

    sections = {"seed": seed, "image": image, "teacher": teacher, "distill": distill}
    params = config.params_for_stage("image_export", {**sections, "export": export})
    stages.export_images(
        student_model.path,
        [s.path for s in strategies],
        package.path,
        params,
        metrics_path=Path(evaluation.path) / "metrics.json",
        student_features=student_features.path,
        manifest=manifest.path,
        splits_path=splits.path,
        cache=SlideCache.from_env(),
    )
    meta = json.loads((Path(package.path) / "model.json").read_text())
    package.metadata.update({key: meta[key] for key in ("strategy", "row", "kind")})
