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
    seed: int,
    features: Output[Dataset],
    student_model: Input[Model] | None = None,
    shard: int = -1,
    shard_size: int = 0,
):
    """`features/<slide_id>.h5` and `status.csv`; `encoder` is `teacher` or `student` (which needs
    `student_model`, the distill output). With `shard` >= 0, only that shard's slides (as for
    `patch`). The metadata has the slide counts by status and the start and end times."""
    import time

    from efcm import config, stages
    from efcm.io.cache import SlideCache
    from efcm.io.dataset import status_counts

    started = time.time()
    params = config.params_for_stage(
        "extract", {"seed": seed, "dataset": dataset, "teacher": teacher, "extract": extract}
    )
    rows = stages.extract(
        manifest.path,
        patches.path,
        features.path,
        params,
        encoder=encoder,
        student=getattr(student_model, "path", None),
        shard=(shard, shard_size) if shard >= 0 else None,
        cache=SlideCache.from_env(),
    )
    features.metadata.update(
        {"shard": shard, "started": started, "finished": time.time(), **status_counts(rows)}
    )
