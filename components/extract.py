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
    store: dict,
    encoder: str,
    seed: int,
    features: Output[Dataset],
    student_model: Input[Model] | None = None,
    teacher_features: Input[Dataset] | None = None,
    shard: int = -1,
    shard_size: int = 0,
):
    """`features/<slide_id>.h5` and `status.csv`; `encoder` is `teacher` or `student` (which needs
    `student_model`, the distill output). With `shard` >= 0, only that shard's slides (as for
    `patch`). With `store.enabled`, the teacher's extraction also writes the patch-shard store
    (`store/`), and the student's reads the store of `teacher_features` instead of the slides.
    The metadata has the slide counts by status and the start and end times."""
    import time

    from efcm import config, stages
    from efcm.io.cache import SlideCache
    from efcm.io.dataset import status_counts
    from efcm.io.store import shard_root

    started = time.time()
    # on a gs:// pipeline root the shards go beside the artifact, not in it (efcm.io.store)
    store = {**store, "uri": shard_root(store.get("uri", ""), features.uri)}
    params = config.params_for_stage(
        "extract",
        {"seed": seed, "dataset": dataset, "teacher": teacher, "extract": extract, "store": store},
    )
    rows = stages.extract(
        manifest.path,
        patches.path,
        features.path,
        params,
        encoder=encoder,
        student=getattr(student_model, "path", None),
        teacher_features=getattr(teacher_features, "path", None),
        shard=(shard, shard_size) if shard >= 0 else None,
        cache=SlideCache.from_env(),
    )
    features.metadata.update(
        {"shard": shard, "started": started, "finished": time.time(), **status_counts(rows)}
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def image_extract(
    manifest: Input[Dataset],
    seed: int,
    image: dict,
    teacher: dict,
    extract: dict,
    encoder: str,
    features: Output[Dataset],
    student_model: Input[Model] | None = None,
):
    """`features.h5` and `status.csv` of every image of the image manifest, with the teacher or
    (`encoder` `student`) the distilled `student_model`; the metadata has the image counts by
    status."""
    from efcm import config, stages
    from efcm.io.cache import SlideCache
    from efcm.io.dataset import status_counts

    params = config.params_for_stage(
        "image_extract", {"seed": seed, "image": image, "teacher": teacher, "extract": extract}
    )
    rows = stages.extract_images(
        manifest.path,
        features.path,
        params,
        encoder=encoder,
        student=getattr(student_model, "path", None),
        cache=SlideCache.from_env(),
    )
    features.metadata.update(status_counts(rows))
