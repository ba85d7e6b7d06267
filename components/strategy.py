"""plan_strategies + strategy: the slide-level strategies of `efcm.registry`, a task each (GPU)."""

from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Model, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_strategies(distill: dict, mil: dict) -> list:
    """The strategies this run compares (`mil.strategies`, `auto` resolved against
    `distill.method`): the ParallelFor items of the `strategy` task."""
    from efcm import config, stages

    params = config.params_for_stage("plan_strategies", {"distill": distill, "mil": mil})
    return stages.plan_strategies(params)[0]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def strategy(
    name: str,
    manifest: Input[Dataset],
    splits: Input[Dataset],
    patches: Input[Dataset],
    teacher_features: Input[Dataset],
    teacher_mil: Input[Model],
    student_model: Input[Model],
    student_features: Input[Dataset],
    seed: int,
    dataset: dict,
    distill: dict,
    train_mil: dict,
    ib: dict,
    mil: dict,
    extract: dict,
    store: dict,
    strategy: Output[Model],
    roc: Output[ClassificationMetrics],
    gpus: int = 1,
):
    """Strategy `name`'s fold models, out-of-fold `predictions.csv`, `attention.h5` and
    `summary.json` in `strategy` (the entry reads only the inputs it names); its out-of-fold ROC
    (the last class against the rest) and confusion matrix in `roc`, for the UI. With `gpus` > 1
    (the pod's GPUs), ETC runs as that many DDP processes under torchrun; the others as one."""
    import json
    from pathlib import Path

    from efcm import config, stages
    from efcm.evaluation.table import prediction_curves
    from efcm.io.cache import SlideCache

    params = config.params_for_stage(
        "strategy",
        {
            "seed": seed,
            "dataset": dataset,
            "distill": distill,
            "train_mil": train_mil,
            "ib": ib,
            "mil": mil,
            "extract": extract,
            "store": store,
        },
    )
    summary = stages.strategy(
        name,
        manifest.path,
        splits.path,
        strategy.path,
        params,
        patches=patches.path,
        teacher_features=teacher_features.path,
        teacher_mil=teacher_mil.path,
        student=student_model.path,
        student_features=student_features.path,
        processes=stages.strategy_processes(name, gpus),
        cache=SlideCache.from_env(),
    )
    strategy.metadata.update({"strategy": name, "skipped": bool(summary.get("skipped"))})
    if not summary.get("skipped"):
        classes = list(params.dataset.classes)
        curve, confusion = prediction_curves(Path(strategy.path), classes)
        roc.log_roc_curve(*curve)
        roc.log_confusion_matrix(classes, confusion)
    # a file behind the artifact (kfp.local's cache takes an output without one for missing)
    Path(roc.path).parent.mkdir(parents=True, exist_ok=True)
    Path(roc.path).write_text(json.dumps(roc.metadata, sort_keys=True))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_image_strategies(image: dict, distill: dict) -> list:
    """The image strategies this run compares (`image.strategies`, `auto` resolved against
    `distill.method`): the ParallelFor items of the image pipeline's `strategy` task."""
    from efcm import config, stages

    stage = "plan_image_strategies"
    sections = {"image": image, "distill": distill}
    return stages.plan_image_strategies(config.params_for_stage(stage, sections))[0]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def image_strategy(
    name: str,
    manifest: Input[Dataset],
    splits: Input[Dataset],
    teacher_heads: Input[Model],
    student_model: Input[Model],
    student_features: Input[Dataset],
    seed: int,
    image: dict,
    distill: dict,
    strategy: Output[Model],
):
    """Image strategy `name`'s fold models, out-of-fold `predictions.csv` and `summary.json` in
    `strategy` (the entry reads only the inputs it names)."""
    from efcm import config, stages
    from efcm.io.cache import SlideCache

    params = config.params_for_stage(
        "image_strategy", {"seed": seed, "image": image, "distill": distill}
    )
    summary = stages.image_strategy(
        name,
        manifest.path,
        splits.path,
        strategy.path,
        params,
        cache=SlideCache.from_env(),
        teacher_heads=teacher_heads.path,
        student=student_model.path,
        student_features=student_features.path,
    )
    strategy.metadata.update({"strategy": name, "skipped": bool(summary.get("skipped"))})
